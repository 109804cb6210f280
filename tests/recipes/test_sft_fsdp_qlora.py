"""sft/fsdp-qlora end to end on CPU: a real bitsandbytes NF4 base loaded layer by layer from the meta device and
sharded with FSDP2 over two gloo processes; the sharded run computes the same steps as one process, resumes exactly,
and its adapter reloads onto the tiny base."""
import math
import shutil

import pytest
import torch

from tests.conftest import REPO, load_recipe, read_metrics, run_script

RECIPE = REPO / "sft" / "fsdp-qlora"
fsdp_qlora = load_recipe(RECIPE)

# dropout off and batches in data order: one process and two shard the same examples per step
SAME_STEPS = ["--report_to=none", "--lora_dropout=0", "--group_by_length=false", "--lr=1e-3", "--eval_data_path=",
              "--max_steps=5"]


def test_two_processes_train_and_write_a_reloadable_adapter(tmp_path):
    from peft import PeftModel

    from common.data import collate_left_padded
    from common.model import load_model, load_tokenizer, resolve_model_path

    out = tmp_path / "out"
    proc = run_script(RECIPE / "run.sh", f"--output_dir={out}", "--max_steps=10", "--batch_size=8", "--grad_accum=1",
                      "--lr=1e-3", "--eval_every=5", "--report_to=none", env_extra={"NGPU": "2"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "over 2 rank(s)" in proc.stdout and "step 10/10 | loss" in proc.stdout
    losses = [r["loss"] for r in read_metrics(out) if "loss" in r]
    evals = [r["eval_loss"] for r in read_metrics(out) if "eval_loss" in r]
    assert len(losses) == 10 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1, losses
    assert len(evals) == 3 and evals[-1] < evals[0] - 0.1, evals

    # the gathered adapter, put on a freshly loaded NF4 base, gives the eval loss the sharded run measured
    model_dir = resolve_model_path("tiny")
    tok = load_tokenizer(model_dir)
    model = PeftModel.from_pretrained(load_model(model_dir, "nf4"), out / "final").eval()
    trained = sum(float(p.abs().sum()) for n, p in model.named_parameters() if "lora_B" in n)
    assert trained > 0  # B starts at zero: a trained adapter has moved it
    batch = collate_left_padded([{"input_ids": tok(t).input_ids} for t in ("Reverse: a b c", "你好")], tok.pad_token_id)
    with torch.no_grad():
        assert torch.isfinite(model(**batch).logits).all()


def test_sharded_over_two_processes_computes_the_same_steps_as_one(tmp_path):
    """FSDP's gathers and reduce-scatters of 4-bit and LoRA shards change nothing: 2 processes x batch 2 make the
    same loss curve as 1 process x batch 4 on the same examples."""
    one = run_script(RECIPE / "run.sh", f"--output_dir={tmp_path / 'one'}", *SAME_STEPS, "--batch_size=4",
                     env_extra={"NGPU": "1"})
    two = run_script(RECIPE / "run.sh", f"--output_dir={tmp_path / 'two'}", *SAME_STEPS, "--batch_size=2",
                     env_extra={"NGPU": "2"})
    assert one.returncode == 0 and two.returncode == 0, one.stderr[-2000:] + two.stderr[-2000:]
    curve = lambda out: [r["loss"] for r in read_metrics(out) if "loss" in r]  # noqa: E731
    assert len(curve(tmp_path / "one")) == 5
    assert curve(tmp_path / "two") == pytest.approx(curve(tmp_path / "one"), abs=2e-4)
    assert curve(tmp_path / "one")[-1] < curve(tmp_path / "one")[0]


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


def test_checkpointing_off_is_refused_with_the_reason(tmp_path):
    proc = run_script(RECIPE / "run.sh", f"--output_dir={tmp_path}", "--gradient_checkpointing=false",
                      env_extra={"NGPU": "1"})
    assert proc.returncode != 0
    assert "--gradient_checkpointing=false" in proc.stderr and "wrong results" in proc.stderr
    assert "Traceback" not in proc.stderr
