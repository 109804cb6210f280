"""Surviving what goes wrong, across recipes: SIGTERM saves a checkpoint and --resume continues; a nan loss stops
before its update (or is skipped); an output_dir of another run is refused; every cls recipe resumes exactly; bad
input is one line naming file, line and field; secrets never reach logs or config.json."""
import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, load_recipe, nan_on_call, read_metrics, run_script

pytestmark = pytest.mark.slow  # every test here runs a recipe, in-process or through run.sh

os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))
SFT_QLORA = REPO / "sft" / "qlora"
sft_qlora = load_recipe(SFT_QLORA)
pretrain_ds = load_recipe(REPO / "pretrain" / "deepspeed")



def run_main(recipe, out, *args):
    return recipe.main(recipe.parse_config(recipe.Config, [f"--output_dir={out}", "--report_to=none", *args]))


@pytest.mark.parametrize("recipe,args", [
    ("sft/qlora", ["--eval_data_path=", "--batch_size=4", "--grad_accum=1"]),
    ("pretrain/deepspeed", ["--batch_size=2"]),
    ("rlhf/dpo-qlora", ["--eval_data_path=", "--batch_size=4"]),
    ("rlhf/grpo-qlora", ["--eval_data_path=", "--batch_size=2", "--group_size=4"]),
    ("sft/full-ft-pipeline", ["--eval_data_path=", "--grad_accum=1"]),
], ids=["sft-qlora", "pretrain-deepspeed", "rlhf-dpo-qlora", "rlhf-grpo-qlora", "sft-full-ft-pipeline"])
def test_sigterm_saves_a_checkpoint_and_resume_continues(recipe, args, tmp_path):
    out = tmp_path / "out"
    command = ["bash", str(REPO / recipe / "run.sh"), f"--output_dir={out}", "--max_steps=500", "--log_every=1",
               "--report_to=none", *args]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 180
    while time.time() < deadline:  # wait for step 3 to be logged, then preempt
        if (out / "metrics.jsonl").is_file() and any(r.get("step", 0) >= 3 and "loss" in r for r in read_metrics(out)):
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)  # run.sh exec'd python: this is the training process
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stdout[-2000:] + stderr[-2000:]
    stopped = [line for line in stdout.splitlines() if line.startswith("stopped by SIGTERM after step")]
    assert stopped and "continue with --resume" in stopped[0], stdout[-2000:]
    step = int(stopped[0].split("after step ")[1].split(":")[0])
    assert step >= 3 and (out / "checkpoints" / f"step_{step:08d}").is_dir() and not (out / "final").exists()
    assert f"step_{step:08d}" in stopped[0]
    proc = run_script(REPO / recipe / "run.sh", f"--output_dir={out}", f"--max_steps={step + 2}", "--log_every=1",
                      "--report_to=none", "--resume", *args)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"at step {step}" in proc.stdout and (out / "final").is_dir()
    assert [r["step"] for r in read_metrics(out) if "loss" in r][-2:] == [step + 1, step + 2]


def test_nan_loss_stops_before_the_update_or_is_skipped(tmp_path, monkeypatch):
    from common.losses import NonFiniteLoss, causal_lm_loss_sum

    args = ["--max_steps=6", "--save_every=2", "--eval_data_path=", "--batch_size=4", "--grad_accum=1", "--log_every=1"]
    monkeypatch.setattr(sft_qlora, "causal_lm_loss_sum", nan_on_call(4, causal_lm_loss_sum))
    with pytest.raises(NonFiniteLoss, match=r"step 4: loss nan, .*stopped before updating the weights \(last "
                                            r"checkpoint: .*step_00000002\)"):
        run_main(sft_qlora, tmp_path / "stop", *args)
    assert [p.name for p in (tmp_path / "stop" / "checkpoints").iterdir()] == ["step_00000002"]
    monkeypatch.setattr(sft_qlora, "causal_lm_loss_sum", nan_on_call(4, causal_lm_loss_sum))
    result = run_main(sft_qlora, tmp_path / "skip", *args, "--on_nan=skip")
    assert [r["step"] for r in read_metrics(tmp_path / "skip") if "loss" in r] == [1, 2, 3, 5, 6]
    assert all(math.isfinite(x) for x in result["losses"])
    assert all(torch.isfinite(p).all() for p in result["model"].parameters())


def test_nan_loss_stops_deepspeed_before_its_update(tmp_path, monkeypatch):
    from common.config import UserError
    from common.losses import NonFiniteLoss, token_loss_sum

    monkeypatch.setattr(pretrain_ds, "token_loss_sum", nan_on_call(3, token_loss_sum))
    with pytest.raises(NonFiniteLoss, match="step 3: loss nan"):
        run_main(pretrain_ds, tmp_path / "ds", "--max_steps=5", "--batch_size=2")
    with pytest.raises(UserError, match="--on_nan"):
        pretrain_ds.parse_config(pretrain_ds.Config, ["--on_nan=skip"])


def test_output_dir_of_another_run_is_refused_unless_overwrite(tmp_path):
    from common.config import UserError

    out = tmp_path / "out"
    args = ["--max_steps=1", "--eval_data_path=", "--batch_size=4", "--grad_accum=1"]
    run_main(sft_qlora, out, *args)
    with pytest.raises(UserError, match=r"holds a different run \(--lr 0.0002 -> 0.001\); use another --output_dir, "
                                        r"--overwrite to replace it"):
        run_main(sft_qlora, out, *args, "--lr=1e-3")
    run_main(sft_qlora, out, *args, "--lr=1e-3", "--overwrite")
    assert json.loads((out / "config.json").read_text())["lr"] == 1e-3
    run_main(sft_qlora, out, *args, "--lr=1e-3", "--save_every=1")  # the same run again: allowed, history afresh
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == [1]
    with pytest.raises(UserError, match="holds checkpoints of this run .*add --resume"):
        run_main(sft_qlora, out, *args, "--lr=1e-3")


@pytest.mark.parametrize("recipe", ["cls/qlora", "cls/peft-int4", "cls/reward-qlora"])
def test_cls_recipes_resume_exactly(recipe, tmp_path):
    import shutil

    module = load_recipe(REPO / recipe)
    args = ["--max_steps=6", "--save_every=3", "--eval_data_path=", "--log_every=1", "--lora_dropout=0.1"]
    straight = run_main(module, tmp_path / "a", *args)
    run_main(module, tmp_path / "b", *args)
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step_00000006")
    resumed = run_main(module, tmp_path / "b", *args, "--resume")
    assert resumed["steps"] == 3
    assert resumed["losses"] == pytest.approx(straight["losses"][3:], abs=1e-6)


BAD_TRAINING_DATA = [
    (b'{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n', ":2: malformed JSON"),
    (b'{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n', ":2: missing field 'output'"),
    (b'{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": 7}\n',
     ":2: field 'output' must be a string, got int"),
    (b'{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": " "}\n', ":2: field 'output' is empty"),
    (b'{"instruction": "a", "output": "b"}\n{"instruction": "\xff\xfe", "output": "b"}\n', ":2: not UTF-8"),
    (b"", ": no records (empty file)"),
]


@pytest.mark.parametrize("content,needle", BAD_TRAINING_DATA)
def test_bad_training_data_is_one_error_naming_file_and_line(tmp_path, content, needle):
    """Each kind of bad record, in-process (the data is read before any model weights): one line naming the file."""
    from common.config import UserError

    bad = tmp_path / "train.jsonl"
    bad.write_bytes(content)
    with pytest.raises(UserError) as error:
        run_main(sft_qlora, tmp_path / "out", f"--data_path={bad}", "--max_steps=1")
    message = str(error.value)
    assert "\n" not in message and message.startswith(str(bad)) and needle in message, message


def test_bad_training_data_is_one_line_through_run_sh(tmp_path):
    """The same error through run.sh (one kind is enough: the printing is the same for every UserError): exit 2, no
    traceback, the error as the last line of stderr."""
    content, needle = BAD_TRAINING_DATA[0]
    bad = tmp_path / "train.jsonl"
    bad.write_bytes(content)
    proc = run_script(SFT_QLORA / "run.sh", f"--data_path={bad}", f"--output_dir={tmp_path / 'out'}", "--max_steps=1")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {bad}") and needle in last, last


def test_bad_pretraining_record_read_by_a_loader_worker_is_one_line(tmp_path):
    bad = tmp_path / "shard.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "broken", \n')
    proc = run_script(REPO / "pretrain" / "deepspeed" / "run.sh", f"--data_path={bad}", "--num_workers=1",
                      f"--output_dir={tmp_path / 'out'}", "--max_steps=1")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (f"error: {bad}:2: expected a JSON object with a string field "
                                                    "'text' (JSONDecodeError)")


def test_bad_model_paths_and_long_samples(tmp_path):
    not_causal = tmp_path / "bert"
    not_causal.mkdir()
    (not_causal / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    for path, needle in ((tmp_path / "nope", "no such folder"), (not_causal, "expected a causal LM checkpoint")):
        proc = run_script(SFT_QLORA / "run.sh", f"--model_path={path}", f"--output_dir={tmp_path / 'out'}")
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert proc.stderr.strip().splitlines()[-1].startswith(f"error: --model_path={path}") and needle in proc.stderr
    # longer than --max_seq_len: truncated by the policy and counted, not an error
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"instruction": "word " * 300, "output": "the answer"}) + "\n")
    proc = run_script(SFT_QLORA / "run.sh", f"--data_path={long}", "--eval_data_path=", "--max_seq_len=64",
                      "--max_steps=1", f"--output_dir={tmp_path / 'out'}", "--report_to=none")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "1 examples" in proc.stdout and "1 truncated" in proc.stdout


def test_secrets_in_the_environment_never_reach_logs_or_config(tmp_path):
    out = tmp_path / "out"
    secrets = {"HF_TOKEN": "hf_SECRETVALUE123", "WANDB_API_KEY": "wandbSECRET456"}
    proc = run_script(SFT_QLORA / "run.sh", f"--output_dir={out}", "--max_steps=1", "--eval_data_path=",
                      env_extra=secrets)
    assert proc.returncode == 0, proc.stderr[-2000:]
    written = proc.stdout + proc.stderr + "".join(p.read_text(errors="ignore") for p in out.rglob("*")
                                                  if p.is_file() and p.suffix in (".json", ".jsonl", ".txt"))
    assert not any(value in written for value in secrets.values())
    source_files = [*REPO.glob("*/*/train.py"), *(REPO / "common").glob("*.py")]
    sources = [p.read_text() for p in source_files]
    assert not any("trust_remote_code=True" in s for s in sources)
