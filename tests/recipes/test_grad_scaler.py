"""The fp16 path's recipe loop (scale, unscale_, clip, scaler.step, update) on CPU: GradScaler("cpu") enabled in an
fp32 run scales by a power of two, so it must train exactly as the unscaled loop does. (fp16 autocast itself needs a
GPU of compute capability < 8.0.)"""
import math

import pytest
import torch

from common.runtime import Precision
from tests.conftest import REPO, load_recipe

sft_qlora = load_recipe(REPO / "sft" / "qlora")
ARGS = ["--report_to=none", "--eval_data_path=", "--batch_size=4", "--grad_accum=2", "--lr=2e-3", "--log_every=1",
        "--max_steps=5"]


@pytest.mark.slow  # two in-process sft/qlora runs
def test_the_loop_with_an_enabled_grad_scaler_trains_as_without(tmp_path, monkeypatch):
    def run(out):
        return sft_qlora.main(sft_qlora.parse_config(sft_qlora.Config, [f"--output_dir={out}", *ARGS]))

    plain = run(tmp_path / "plain")["losses"]
    scalers = []
    real_grad_scaler = torch.amp.GradScaler

    def recording_grad_scaler(*args, **kwargs):
        scalers.append(real_grad_scaler(*args, **kwargs))
        return scalers[-1]

    monkeypatch.setattr(sft_qlora, "training_precision",
                        lambda device, loss_scaling: Precision(torch.float32, True, "fp32 + GradScaler (test)"))
    monkeypatch.setattr(torch.amp, "GradScaler", recording_grad_scaler)
    scaled = run(tmp_path / "scaled")["losses"]
    assert [s.is_enabled() for s in scalers] == [True] and scalers[0].get_scale() == 2.0 ** 16  # no overflow
    assert all(math.isfinite(x) for x in scaled) and scaled[-1] < scaled[0] - 0.1, scaled  # loss falls
    assert scaled == pytest.approx(plain, abs=1e-6)
