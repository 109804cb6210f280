"""Classification / regression / pairwise loss sums, checked against torch; the finite-step decision and its error."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common.config import UserError
from common.losses import (
    NonFiniteLoss,
    classification_loss_sum,
    is_finite,
    non_finite_error,
    pairwise_loss_sum,
    regression_loss_sum,
)


def test_losses_match_torch():
    logits, labels = torch.randn(6, 3), torch.tensor([0, 1, 2, 2, 1, 0])
    assert classification_loss_sum(logits, labels).item() == pytest.approx(
        F.cross_entropy(logits, labels, reduction="sum").item(), rel=1e-6)
    assert classification_loss_sum(logits, labels, label_smoothing=0.1).item() == pytest.approx(
        F.cross_entropy(logits, labels, reduction="sum", label_smoothing=0.1).item(), rel=1e-6)
    # focal with gamma 0 is cross-entropy; gamma > 0 only lowers it
    assert classification_loss_sum(logits, labels, "focal", focal_gamma=0.0).item() == pytest.approx(
        classification_loss_sum(logits, labels).item(), rel=1e-6)
    assert classification_loss_sum(logits, labels, "focal", focal_gamma=2.0) < classification_loss_sum(logits, labels)
    weights = torch.tensor([1.0, 2.0, 0.5])
    expected = (F.cross_entropy(logits, labels, reduction="none") * weights[labels]).sum()
    torch.testing.assert_close(classification_loss_sum(logits, labels, class_weights=weights), expected)
    pred, target = torch.tensor([1.0, 2.0, 5.0]), torch.tensor([1.5, 2.0, 2.0])
    assert regression_loss_sum(pred, target).item() == pytest.approx(0.25 + 9.0)
    assert regression_loss_sum(pred, target, "huber").item() == pytest.approx(0.125 + 2.5)
    assert pairwise_loss_sum(torch.tensor([2.0]), torch.tensor([0.0])).item() == pytest.approx(
        -np.log(1 / (1 + np.exp(-2))))


@pytest.mark.parametrize("loss,grad_norm,loss_scaled,expected", [
    (1.0, 0.5, False, True), (1.0, None, False, True), (1.0, torch.tensor(2.0), False, True),
    (float("nan"), 0.5, False, False), (float("inf"), 0.5, False, False),
    (1.0, torch.tensor(float("nan")), False, False), (1.0, float("inf"), False, False),
    (1.0, float("inf"), True, True),  # an fp16 overflow of the scaled loss: the GradScaler skips it
    (float("nan"), 0.5, True, False)])
def test_is_finite(loss, grad_norm, loss_scaled, expected):
    assert is_finite(loss, grad_norm, loss_scaled) is expected


def test_non_finite_error_names_the_step_the_values_and_the_last_checkpoint(tmp_path):
    error = non_finite_error(7, float("nan"), torch.tensor(3.5), tmp_path)
    assert isinstance(error, NonFiniteLoss) and isinstance(error, UserError)
    assert str(error) == ("step 7: loss nan, gradient norm 3.5; stopped before updating the weights (last checkpoint: "
                          "none); lower --lr or check the data, resume with --resume, or skip such steps with "
                          "--on_nan=skip")
    last = tmp_path / "checkpoints" / "step_00000005"
    last.mkdir(parents=True)
    (last / "trainer_state.pt").write_bytes(b"")
    assert f"(last checkpoint: {last})" in str(non_finite_error(7, 1.0, None, tmp_path))
