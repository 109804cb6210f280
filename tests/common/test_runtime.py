"""The precision decision (bf16 from compute capability 8.0; below it fp16 + GradScaler, DeepSpeed fp16 or fp32 by
recipe), the attention choice below 8.0, and the fp16 loss scaler's overflow skip against --on_nan=stop. No GPU here:
torch.cuda's capability query is monkeypatched, and the scaler runs as torch.amp.GradScaler("cpu")."""
import math
import types

import pytest
import torch

from common.config import UserError
from common.losses import NonFiniteLoss, is_finite, non_finite_error
from common.model import resolve_attention
from common.runtime import Precision, training_precision

CUDA = torch.device("cuda", 0)


@pytest.fixture
def capability(monkeypatch):
    def set_capability(major_minor):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: major_minor)
        # emulated bf16 counts as supported on pre-Ampere GPUs: the decision must not ask this
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)

    return set_capability


@pytest.mark.parametrize("major_minor", [(7, 0), (7, 5)])
def test_below_compute_capability_8_there_is_no_bf16(capability, major_minor):
    capability(major_minor)
    name = f"compute capability {major_minor[0]}.{major_minor[1]}"
    scaled = training_precision(CUDA, "grad_scaler")
    assert (scaled.dtype, scaled.grad_scaler) == (torch.float16, True)
    assert scaled.reason == f"fp16 autocast + GradScaler ({name}: no bf16)"
    deepspeed = training_precision(CUDA, "deepspeed")
    assert (deepspeed.dtype, deepspeed.grad_scaler) == (torch.float16, False)  # DeepSpeed scales the loss itself
    assert name in deepspeed.reason and "dynamic loss scaling" in deepspeed.reason
    fsdp = training_precision(CUDA, "none")
    assert (fsdp.dtype, fsdp.grad_scaler) == (torch.float32, False)
    assert name in fsdp.reason


@pytest.mark.parametrize("major_minor", [(8, 0), (9, 0)])
def test_from_compute_capability_8_every_recipe_trains_in_bf16(capability, major_minor):
    capability(major_minor)
    for loss_scaling in ("grad_scaler", "deepspeed", "none"):
        precision = training_precision(CUDA, loss_scaling)
        assert precision == Precision(torch.bfloat16, False, f"bf16 autocast (compute capability "
                                                            f"{major_minor[0]}.{major_minor[1]})")


def test_cpu_trains_in_fp32_without_a_scaler(monkeypatch):
    def no_gpu(*args, **kwargs):
        raise AssertionError("a CPU run asked torch.cuda")

    monkeypatch.setattr(torch.cuda, "get_device_capability", no_gpu)
    for loss_scaling in ("grad_scaler", "deepspeed", "none"):
        precision = training_precision(torch.device("cpu"), loss_scaling)
        assert (precision.dtype, precision.grad_scaler) == (torch.float32, False)
    with pytest.raises(ValueError, match="loss_scaling"):
        training_precision(torch.device("cpu"), "apex")


@pytest.mark.parametrize("major_minor, expected", [((7, 0), "sdpa"), ((7, 5), "sdpa"), ((8, 0), "flash_attention_2"),
                                                   ((9, 0), "flash_attention_2")])
def test_flash_attention_only_from_compute_capability_8(capability, monkeypatch, major_minor, expected):
    import importlib.util

    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args):
        return types.SimpleNamespace(name=name) if name == "flash_attn" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)  # flash_attn "installed"
    capability(major_minor)
    assert resolve_attention("auto", CUDA) == expected
    assert resolve_attention("auto", torch.device("cpu")) == "sdpa"
    assert resolve_attention("eager", CUDA) == "eager"


def overflowing_step(scaler, on_nan, tmp_path, loss_scale=1.0):
    """One optimizer step of a tiny model the way the recipes take it (scale, backward, unscale_, clip, check, step,
    update); loss_scale large enough makes the scaled gradients overflow to inf."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    loss = model(torch.ones(2, 4)).sum() * loss_scale
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    if not is_finite(loss.item(), grad_norm, scaler.is_enabled()):
        if on_nan == "stop":
            raise non_finite_error(1, loss.item(), grad_norm, tmp_path)
        scaler.update()
        return before, model, False
    scaler.step(optimizer)
    scaler.update()
    changed = any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    return before, model, changed


def test_a_scaler_skipped_overflow_does_not_stop_the_run(tmp_path):
    """In fp16 a scaled loss that overflows gives inf gradients: the scaler skips that update and halves its scale.
    --on_nan=stop must let it, and the next step trains."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    _, _, changed = overflowing_step(scaler, "stop", tmp_path, loss_scale=1e36)  # 1e36 * 65536 > fp32 max
    assert not changed  # the scaler skipped the update
    assert scaler.get_scale() == 2.0 ** 15
    _, _, changed = overflowing_step(scaler, "stop", tmp_path)
    assert changed and scaler.get_scale() == 2.0 ** 15


def test_a_nan_loss_still_stops_with_the_scaler(tmp_path):
    scaler = torch.amp.GradScaler("cpu")
    with pytest.raises(NonFiniteLoss, match="step 1: loss nan"):
        overflowing_step(scaler, "stop", tmp_path, loss_scale=math.nan)
    assert issubclass(NonFiniteLoss, UserError)


def test_without_the_scaler_inf_gradients_still_stop(tmp_path):
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    assert is_finite(1.0, torch.tensor(math.inf), scaler.is_enabled()) is False  # skipped, or with stop:
    with pytest.raises(NonFiniteLoss, match="gradient norm inf"):
        raise non_finite_error(1, 1.0, torch.tensor(math.inf), tmp_path)
    assert is_finite(1.0, torch.tensor(math.inf), True) is True  # the scaler's to skip
