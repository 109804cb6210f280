"""Classification / regression / pairwise loss sums, checked against torch."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common.losses import classification_loss_sum, pairwise_loss_sum, regression_loss_sum


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
