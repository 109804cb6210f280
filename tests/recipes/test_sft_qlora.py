"""sft/qlora end to end on CPU with the tiny model and a real bitsandbytes NF4 base."""
import json
import math
import os
import shutil

import pytest
import torch

from tests.conftest import REPO, load_recipe, read_metrics, run_script

RECIPE = REPO / "sft" / "qlora"
sft_qlora = load_recipe(RECIPE)

FAST = ["--report_to=none", "--batch_size=8", "--grad_accum=1", "--lr=1e-3", "--log_every=1"]



def run_main(out, *args):
    return sft_qlora.main(sft_qlora.parse_config(sft_qlora.Config, [f"--output_dir={out}", *FAST, *args]))


@pytest.mark.slow
def test_run_sh_trains_and_writes_artifacts(tmp_path):
    out = tmp_path / "out"
    proc = run_script(RECIPE / "run.sh", f"--output_dir={out}", "--max_steps=12", "--batch_size=8", "--grad_accum=1",
                      "--lr=1e-3", "--eval_every=6")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    losses = [r["loss"] for r in read_metrics(out) if "loss" in r]
    evals = [r["eval_loss"] for r in read_metrics(out) if "eval_loss" in r]
    assert len(losses) == 12 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1, losses  # loss falls
    assert len(evals) == 3 and evals[-1] < evals[0]
    assert all(k in r for r in read_metrics(out) if "loss" in r for k in ("step", "loss", "lr", "tokens_per_s"))
    assert "step 12/12 | loss" in proc.stdout and "tok/s | mem" in proc.stdout
    final = out / "final"
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (final / name).is_file(), name
    assert json.loads((out / "config.json").read_text())["max_steps"] == 12
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_saved_adapter_reloads_and_reproduces_logits(tmp_path):
    from peft import PeftModel

    from common.data import collate_left_padded
    from common.model import load_model, resolve_model_path

    result = run_main(tmp_path / "out", "--max_steps=3")
    tok = result["tokenizer"]
    texts = ("Reverse: a b c", "你好，世界")
    batch = collate_left_padded([{"input_ids": tok(t).input_ids} for t in texts], tok.pad_token_id)
    model = result["model"].eval()
    with torch.no_grad():
        in_memory = model(**batch).logits
    base = load_model(resolve_model_path("tiny"), "nf4")
    reloaded = PeftModel.from_pretrained(base, result["final_dir"]).eval()
    with torch.no_grad():
        from_disk = reloaded(**batch).logits
    torch.testing.assert_close(from_disk, in_memory, atol=1e-5, rtol=0)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in lora_b)  # the adapter was trained, so the comparison means something


@pytest.mark.slow
def test_synthetic_task_beats_untrained_model(tmp_path):
    """Reversing letter strings: held-out loss after a short CPU run must be far below the untrained model's."""
    data = REPO / "data" / "synthetic"
    result = run_main(tmp_path / "out", f"--data_path={data / 'reverse_train.jsonl'}", "--max_steps=40",
                      f"--eval_data_path={data / 'reverse_eval.jsonl'}", "--batch_size=16", "--lr=2e-3",
                      "--max_grad_norm=1", "--lora_modules_to_save=lm_head")
    evals = [r["eval_loss"] for r in read_metrics(tmp_path / "out") if "eval_loss" in r]
    untrained, trained = evals[0], evals[-1]
    assert trained == pytest.approx(result["eval_loss"])
    assert trained < 0.5 * untrained, (untrained, trained)


@pytest.mark.slow
def test_resume_continues_exactly(tmp_path):
    straight = run_main(tmp_path / "a", "--max_steps=6", "--save_every=3", "--lora_dropout=0.1")
    run_main(tmp_path / "b", "--max_steps=6", "--save_every=3", "--lora_dropout=0.1")
    # keep only the step-3 checkpoint of run b, then resume it
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step_00000006")
    resumed = run_main(tmp_path / "b", "--max_steps=6", "--save_every=3", "--lora_dropout=0.1", "--resume")
    assert resumed["steps"] == 3
    assert resumed["losses"] == pytest.approx(straight["losses"][3:], abs=1e-6)


@pytest.mark.slow
def test_chunked_loss_trains_as_the_plain_loss(tmp_path):
    """--loss_chunk: the same losses, eval loss and adapter as the plain loss, on packed rows (every position of a
    row predicts a trained token, so only the chunking bounds the logits; left-padded batches: the loss function's
    own tests in tests/common/test_chunked_loss.py)."""
    extra = ["--max_steps=3", "--packing"]
    plain = run_main(tmp_path / "plain", *extra)
    chunked = run_main(tmp_path / "chunked", *extra, "--loss_chunk=5")
    assert chunked["losses"] == pytest.approx(plain["losses"], rel=1e-5)
    assert chunked["eval_loss"] == pytest.approx(plain["eval_loss"], rel=1e-5)
    for name, weight in plain["model"].state_dict().items():
        if "lora_" in name:
            torch.testing.assert_close(chunked["model"].state_dict()[name], weight, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_bad_data_line_is_one_clear_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": 5}\n')
    proc = run_script(RECIPE / "run.sh", f"--data_path={bad}", f"--output_dir={tmp_path / 'out'}", "--max_steps=1")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == f"error: {bad}:2: field 'output' must be a string, got int"
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_unknown_option_and_missing_model_are_clear(tmp_path):
    proc = run_script(RECIPE / "run.sh", "--lerning_rate=1")
    assert proc.returncode == 2 and "unknown option --lerning_rate" in proc.stderr and "--lr" in proc.stderr
    proc = run_script(RECIPE / "run.sh", f"--model_path={tmp_path / 'nope'}", f"--output_dir={tmp_path / 'o'}")
    assert proc.returncode == 2 and "no such folder" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
@pytest.mark.skipif(os.cpu_count() < 2, reason="two processes need two cores")
def test_two_process_data_parallel(tmp_path):
    """An eval file of one record leaves one rank with nothing to evaluate: it must not hang the other."""
    out, one = tmp_path / "out", tmp_path / "one.jsonl"
    one.write_text((REPO / "data" / "sft" / "eval.jsonl").read_text(encoding="utf-8").splitlines()[0] + "\n")
    proc = run_script(RECIPE / "run.sh", f"--output_dir={out}", "--max_steps=3", "--report_to=none",
                      f"--eval_data_path={one}", env_extra={"NGPU": "2", "MASTER_PORT": "29631"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "torchrun, 2 processes" in proc.stdout
    assert (out / "final" / "adapter_model.safetensors").is_file()
    losses = [r["loss"] for r in read_metrics(out) if "loss" in r]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    evals = [r["eval_loss"] for r in read_metrics(out) if "eval_loss" in r]
    assert len(evals) == 2 and all(math.isfinite(x) for x in evals), evals
