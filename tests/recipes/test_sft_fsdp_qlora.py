"""sft/fsdp-qlora end to end on CPU: a real bitsandbytes NF4 base loaded layer by layer from the meta device and
sharded with FSDP2 over two gloo processes; the sharded run computes the same steps as one process, resumes exactly,
and its adapter reloads onto the tiny base."""
import json
import math
import shutil

import pytest

from common.runtime import free_port
from tests.conftest import REPO, load_recipe, read_metrics, run_script

RECIPE = REPO / "sft" / "fsdp-qlora"
fsdp_qlora = load_recipe(RECIPE)

# dropout off and batches in data order: one process and two shard the same examples per step
SAME_STEPS = ["--report_to=none", "--lora_dropout=0", "--group_by_length=false", "--lr=1e-3", "--eval_data_path=",
              "--max_steps=5"]


@pytest.mark.slow
def test_two_processes_train_and_write_an_adapter_that_evaluates_the_same_reloaded(tmp_path):
    """Two gloo processes train (loss and eval loss fall), and the adapter gathered to rank 0, put on a freshly
    loaded NF4 base in one process, gives the eval loss the sharded run measured: the saved adapter is the trained
    one, and the evals in between (no-grad forwards) left the 4-bit weights as they were."""
    out = tmp_path / "out"
    proc = run_script(RECIPE / "run.sh", f"--output_dir={out}", "--max_steps=10", "--batch_size=8", "--grad_accum=1",
                      "--lr=1e-3", "--eval_every=5", "--report_to=none",
                      env_extra={"NGPU": "2", "MASTER_PORT": str(free_port())})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "over 2 rank(s)" in proc.stdout and "step 10/10 | loss" in proc.stdout
    losses = [r["loss"] for r in read_metrics(out) if "loss" in r]
    evals = [r["eval_loss"] for r in read_metrics(out) if "eval_loss" in r]
    assert len(losses) == 10 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1, losses
    assert len(evals) == 3 and evals[-1] < evals[0] - 0.1, evals

    evaluate = run_script(REPO / "tools" / "evaluate.py", "--model=tiny", f"--adapter={out / 'final'}",
                          f"--data={REPO / 'data' / 'sft' / 'eval.jsonl'}", "--load_in_4bit", "--exact_match=false",
                          f"--out={tmp_path / 'eval.json'}", env_extra={"PYTHONPATH": str(REPO)})
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    assert json.loads((tmp_path / "eval.json").read_text())["loss"] == pytest.approx(evals[-1], abs=1e-4)


@pytest.mark.slow
def test_sharded_over_two_processes_computes_the_same_steps_as_one(tmp_path):
    """FSDP's gathers and reduce-scatters of 4-bit and LoRA shards change nothing: 2 processes x batch 2 make the
    same loss curve as 1 process x batch 4 on the same examples."""
    one = run_script(RECIPE / "run.sh", f"--output_dir={tmp_path / 'one'}", *SAME_STEPS, "--batch_size=4",
                     env_extra={"NGPU": "1", "MASTER_PORT": str(free_port())})
    one_record = tmp_path / "one.jsonl"  # one rank has no eval batch of its own, yet joins every sharded forward
    one_record.write_text((REPO / "data" / "sft" / "eval.jsonl").read_text(encoding="utf-8").splitlines()[0] + "\n")
    two = run_script(RECIPE / "run.sh", f"--output_dir={tmp_path / 'two'}", *SAME_STEPS, "--batch_size=2",
                     f"--eval_data_path={one_record}", env_extra={"NGPU": "2", "MASTER_PORT": str(free_port())})
    assert one.returncode == 0 and two.returncode == 0, one.stderr[-2000:] + two.stderr[-2000:]
    curve_one = [r["loss"] for r in read_metrics(tmp_path / "one") if "loss" in r]
    curve_two = [r["loss"] for r in read_metrics(tmp_path / "two") if "loss" in r]
    assert len(curve_one) == 5
    assert curve_two == pytest.approx(curve_one, abs=2e-4)
    assert curve_one[-1] < curve_one[0]
    evals = [r["eval_loss"] for r in read_metrics(tmp_path / "two") if "eval_loss" in r]
    assert len(evals) == 2 and all(math.isfinite(x) for x in evals), evals


@pytest.mark.slow
def test_resume_gives_the_same_next_steps(tmp_path):
    """Interrupted after step 3 (its later checkpoint gone) and resumed: adapters, AdamW states, schedule, RNG and
    data position come back from the sharded checkpoint, and the next steps repeat the uninterrupted run's."""
    args = [f"--output_dir={tmp_path}", "--report_to=none", "--batch_size=8", "--grad_accum=1", "--eval_data_path=",
            "--lr=1e-3", "--max_steps=6", "--save_every=3"]
    straight = fsdp_qlora.main(fsdp_qlora.parse_config(fsdp_qlora.Config, args))
    shutil.rmtree(tmp_path / "checkpoints" / "step_00000006")
    resumed = fsdp_qlora.main(fsdp_qlora.parse_config(fsdp_qlora.Config, [*args, "--resume"]))
    assert resumed["steps"] == 3
    assert resumed["losses"] == pytest.approx(straight["losses"][3:], abs=1e-5)


@pytest.mark.slow
def test_cpu_offload_without_a_gpu_is_refused_in_one_line(tmp_path):
    proc = run_script(RECIPE / "run.sh", f"--output_dir={tmp_path}", "--cpu_offload=true",
                      env_extra={"NGPU": "1", "MASTER_PORT": str(free_port())})
    assert proc.returncode == 2
    assert "--cpu_offload=true" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_a_bad_training_record_is_one_line_through_the_default_run_sh(tmp_path):
    bad = tmp_path / "train.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": 7}\n')
    proc = run_script(RECIPE / "run.sh", f"--data_path={bad}", f"--output_dir={tmp_path / 'out'}",
                      env_extra={"MASTER_PORT": str(free_port())})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == f"error: {bad}:2: field 'output' must be a string, got int"
