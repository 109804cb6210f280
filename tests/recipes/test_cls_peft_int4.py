"""cls/peft-int4 end to end on CPU: the tiny Llama quantized to GPTQ int4 by gptqmodel, LoRA and a score head
trained on top, for classification and regression."""
import json
import math

import numpy as np
import pytest
import torch

from tests.conftest import REPO, load_recipe, read_jsonl, run_script

pytestmark = pytest.mark.slow  # end-to-end runs of the recipe (in-process or through run.sh)
RECIPE = REPO / "cls" / "peft-int4"
DATA = REPO / "data" / "cls"
cls_peft_int4 = load_recipe(RECIPE)
LABELS = ["negative", "neutral", "positive"]



@pytest.fixture(scope="module")
def gptq_dir():
    from common.gptq import materialize_tiny_gptq

    return materialize_tiny_gptq()


def test_classification_run_sh_beats_majority_and_matches_sklearn(tmp_path, gptq_dir):
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

    out = tmp_path / "out"
    proc = run_script(RECIPE / "run.sh", f"--output_dir={out}", "--max_steps=40", "--lr=2e-3", "--log_every=1",
                      f"--predict_data_path={DATA / 'eval.jsonl'}", "--report_to=none")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "GPTQ int4 group 128 base + LoRA" in proc.stdout
    losses = [r["loss"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 40 and all(math.isfinite(x) for x in losses)
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3, losses
    results = json.loads((out / "eval_results.json").read_text())
    assert results["accuracy"] > results["baseline_majority"]["accuracy"] + 0.3, results
    truth = [r["label"] for r in read_jsonl(DATA / "eval.jsonl")]
    predicted = [r["prediction"] for r in read_jsonl(out / "predictions.jsonl")]
    assert results["accuracy"] == pytest.approx(accuracy_score(truth, predicted))
    assert results["macro_f1"] == pytest.approx(f1_score(truth, predicted, average="macro"))
    assert results["confusion_matrix"] == confusion_matrix(truth, predicted, labels=LABELS).tolist()
    final = out / "final"
    assert json.loads((final / "labels.json").read_text())["labels"] == LABELS
    adapter = json.loads((final / "adapter_config.json").read_text())
    projections = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert set(adapter["target_modules"]) == projections
    assert "score" in adapter["modules_to_save"]


def test_regression_beats_mean_baseline_and_adapter_reloads(tmp_path, gptq_dir):
    from peft import PeftModel
    from scipy.stats import spearmanr
    from transformers import AutoModelForSequenceClassification

    from common.data import collate_left_padded
    from common.gptq import load_gptq_model
    from common.model import PooledClassifier

    result = cls_peft_int4.main(cls_peft_int4.parse_config(cls_peft_int4.Config, [
        f"--output_dir={tmp_path}", "--task=regression", f"--data_path={DATA / 'regression_train.jsonl'}",
        f"--eval_data_path={DATA / 'regression_eval.jsonl'}", f"--predict_data_path={DATA / 'regression_eval.jsonl'}",
        "--max_steps=40", "--lr=2e-3", "--report_to=none", "--loss=huber"]))
    ev = result["eval"]
    assert ev["mse"] < 0.5 * ev["baseline_mean"]["mse"], ev
    truth = [r["label"] for r in read_jsonl(DATA / "regression_eval.jsonl")]
    predicted = [r["prediction"] for r in read_jsonl(tmp_path / "predictions.jsonl")]
    assert ev["mse"] == pytest.approx(np.mean((np.array(truth) - np.array(predicted)) ** 2), rel=1e-5)
    assert ev["spearman"] == pytest.approx(spearmanr(truth, predicted)[0], rel=1e-5)
    # the adapter and score head in final/ onto a fresh load of the same GPTQ checkpoint give the same scores
    tok = result["tokenizer"]
    batch = collate_left_padded([{"input_ids": tok(t).input_ids + [tok.eos_token_id]}
                                 for t in ("The movie was great.", "这个酒店很糟糕。", "ok")], tok.pad_token_id)
    with torch.no_grad():
        in_memory = result["classifier"].eval()(**batch)
    base = load_gptq_model(gptq_dir, AutoModelForSequenceClassification, num_labels=1)
    reloaded = PooledClassifier(PeftModel.from_pretrained(base, result["final_dir"]), "last").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch), in_memory, atol=1e-5, rtol=0)


def test_full_precision_model_is_a_clear_error(tmp_path, tiny_dir):
    proc = run_script(RECIPE / "run.sh", f"--model_path={tiny_dir}", f"--output_dir={tmp_path / 'o'}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: --model_path={tiny_dir}: not a GPTQ checkpoint")
