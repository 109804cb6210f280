"""Two processes on CPU for the recipes whose own tests have no two-process run: an eval file of one record gives
one rank nothing to score, and that rank must not hang the other (DDP broadcasts buffers in every forward of the
wrapped model, so the eval runs on the unwrapped one)."""
import json
import math
import os

import pytest

from tests.conftest import REPO, read_metrics, run_script

pytestmark = pytest.mark.slow  # two-process recipe runs

DATA = REPO / "data" / "cls"
ONE_RECORD = {"cls/qlora": DATA / "eval.jsonl", "cls/peft-int4": DATA / "eval.jsonl",
              "cls/reward-qlora": DATA / "preference_eval.jsonl"}


@pytest.fixture(scope="module")
def gptq_dir():
    from common.gptq import materialize_tiny_gptq

    return materialize_tiny_gptq()


@pytest.mark.skipif(os.cpu_count() < 2, reason="two processes need two cores")
@pytest.mark.parametrize("recipe", list(ONE_RECORD))
def test_one_eval_record_over_two_processes_does_not_hang(recipe, tmp_path, request):
    from common.runtime import free_port

    if recipe == "cls/peft-int4":
        request.getfixturevalue("gptq_dir")  # quantized once, not inside the two processes
    one = tmp_path / "one.jsonl"
    first_record = ONE_RECORD[recipe].read_text(encoding="utf-8").splitlines()[0]
    one.write_text(first_record + "\n", encoding="utf-8")
    out = tmp_path / "out"
    proc = run_script(REPO / recipe / "run.sh", f"--output_dir={out}", f"--eval_data_path={one}", "--max_steps=2",
                      "--report_to=none", timeout=240, env_extra={"NGPU": "2", "MASTER_PORT": str(free_port())})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "torchrun, 2 processes" in proc.stdout
    evals = [r["eval_loss"] for r in read_metrics(out) if "eval_loss" in r]
    assert len(evals) == 2 and all(math.isfinite(x) for x in evals), evals  # before training and at the end
    assert json.loads((out / "eval_results.json").read_text())["step"] == 2
