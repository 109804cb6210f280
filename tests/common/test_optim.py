"""common/optim.py: the learning rate a run gets when --lr is not given, the warmup-cosine schedule, the weight-decay
groups and the optimizer built on them."""
import pytest
import torch

from common.config import UserError
from common.optim import make_optimizer, resolve_lr, warmup_cosine, weight_decay_groups


def test_default_lr_is_the_real_base_rate_unless_the_model_is_tiny():
    real = resolve_lr(None, "/models/Llama-2-7b-hf", real_base_lr=2e-4, tiny_lr=1e-3)
    tiny = resolve_lr(None, "tiny", real_base_lr=2e-4, tiny_lr=1e-3)
    assert real.value == 2e-4 and "real base" in real.description
    assert tiny.value == 1e-3 and tiny.description == "1.0e-03 (tiny model; a real base gets 2.0e-04)"


@pytest.mark.parametrize("model_path", ["tiny", "/models/Llama-2-7b-hf"])
def test_a_given_lr_wins_over_both_defaults(model_path):
    lr = resolve_lr(3e-5, model_path, real_base_lr=2e-4, tiny_lr=1e-3)
    assert lr.value == 3e-5 and lr.description == "3.0e-05 (--lr)"


@pytest.mark.parametrize("bad", [0.0, -1e-4, float("nan")])
def test_a_non_positive_lr_is_a_config_error(bad):
    with pytest.raises(UserError, match="--lr="):
        resolve_lr(bad, "tiny", real_base_lr=2e-4, tiny_lr=1e-3)


def test_warmup_cosine_rises_linearly_then_decays_to_min_ratio():
    factor = warmup_cosine(total_steps=110, warmup_steps=10, min_ratio=0.1)
    assert factor(0) == pytest.approx(1 / 11)
    assert factor(4) == pytest.approx(5 / 11)
    assert factor(10) == pytest.approx(1.0)  # the end of warmup: the peak rate
    assert factor(60) == pytest.approx(0.55)  # halfway through the decay: midway between 1 and min_ratio
    assert factor(110) == pytest.approx(0.1) and factor(500) == pytest.approx(0.1)  # the end, and past it
    no_warmup = warmup_cosine(total_steps=4, warmup_steps=0, min_ratio=0.0)
    assert [no_warmup(s) for s in range(5)] == pytest.approx([1.0, 0.8535534, 0.5, 0.1464466, 0.0])


class TwoLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 3)  # weight decays, bias does not
        self.norm = torch.nn.LayerNorm(3)  # a norm's weight and bias do not
        self.frozen = torch.nn.Linear(3, 3, bias=False).requires_grad_(False)  # not trained: in no group


def test_weight_decay_groups_decay_matrices_only():
    model = TwoLayers()
    decay, no_decay = weight_decay_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert decay["params"] == [model.proj.weight]
    assert no_decay["params"] == [model.proj.bias, model.norm.weight, model.norm.bias]


def test_make_optimizer_groups_a_zero3_partitioned_weight_by_its_ds_shape():
    """Under ZeRO-3 a weight's own shape is its empty partition; its ds_shape is the real one: still a matrix."""
    model = TwoLayers()
    model.proj.weight.data = torch.empty(0)
    model.proj.weight.ds_shape = torch.Size([3, 4])
    optimizer = make_optimizer(model, "adamw", 1e-3, 0.1, torch.device("cpu"))
    grouped = [(g["weight_decay"], g["params"]) for g in optimizer.param_groups]
    expected = [(g["weight_decay"], g["params"]) for g in weight_decay_groups(model, 0.1)]
    assert grouped == expected and grouped[0] == (0.1, [model.proj.weight])
    assert make_optimizer(model, "paged_adamw_8bit", 1e-3, 0.1, torch.device("cpu")).param_groups[0]["lr"] == 1e-3
    with pytest.raises(UserError, match="^--optim=sgd: expected one of adamw, paged_adamw_8bit, adamw_8bit$"):
        make_optimizer(model, "sgd", 1e-3, 0.1, torch.device("cpu"))
