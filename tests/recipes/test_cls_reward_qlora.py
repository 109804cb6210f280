"""cls/reward-qlora end to end on CPU with the tiny model and a real bitsandbytes NF4 base."""
import json
import math

import pytest
import torch

from tests.conftest import REPO, load_recipe, run_script

pytestmark = pytest.mark.slow  # end-to-end runs of the recipe (in-process or through run.sh)
RECIPE = REPO / "cls" / "reward-qlora"
reward_qlora = load_recipe(RECIPE)


def test_run_sh_learns_preferences(tmp_path):
    out = tmp_path / "out"
    proc = run_script(RECIPE / "run.sh", f"--output_dir={out}", "--max_steps=40", "--log_every=1", "--report_to=none")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    assert len(losses) == 40 and all(math.isfinite(x) for x in losses)
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 0.2, evals
    results = json.loads((out / "eval_results.json").read_text())
    assert results["pairwise_accuracy"] >= 0.65 and results["pairs"] == 80, results  # chance is 0.5
    assert results["pairwise_accuracy"] == evals[-1]["eval_pairwise_accuracy"]
    assert json.loads((out / "final" / "reward_model.json").read_text())["pooling"] == "last"
    assert "pairwise accuracy" in proc.stdout


def test_saved_reward_model_reloads_and_reproduces_rewards(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from common.data import Record, build_preference_examples
    from common.model import PooledClassifier, load_model, resolve_model_path

    result = reward_qlora.main(reward_qlora.parse_config(reward_qlora.Config, [
        f"--output_dir={tmp_path}", "--max_steps=3", "--report_to=none", "--eval_data_path="]))
    tok = result["tokenizer"]
    pairs, _ = build_preference_examples([Record({"prompt": "Capital of Peru?", "chosen": "Lima.",
                                                  "rejected": "I don't know."}, "x:1")], tok, 128)
    scored = reward_qlora.score_pairs(result["reward_model"].eval(), pairs, tok.pad_token_id, torch.device("cpu"))
    in_memory = [t.detach() for t in scored]
    base = load_model(resolve_model_path("tiny"), "nf4", model_class=AutoModelForSequenceClassification, num_labels=1)
    reloaded = PooledClassifier(PeftModel.from_pretrained(base, result["final_dir"]), "last").eval()
    with torch.no_grad():
        from_disk = reward_qlora.score_pairs(reloaded, pairs, tok.pad_token_id, torch.device("cpu"))
    for a, b in zip(from_disk, in_memory):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert not torch.equal(in_memory[0], in_memory[1])  # chosen and rejected score differently


def test_missing_rejected_field_is_one_clear_line(tmp_path):
    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": "q", "chosen": "a"}\n')
    proc = run_script(RECIPE / "run.sh", f"--data_path={bad}", f"--output_dir={tmp_path / 'out'}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"error: {bad}:2: missing field 'rejected'"
