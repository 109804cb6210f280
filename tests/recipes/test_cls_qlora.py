"""cls/qlora end to end on CPU with the tiny model and a real bitsandbytes NF4 base: classification and regression."""
import json
import math

import numpy as np
import pytest
import torch

from tests.conftest import REPO, load_recipe, read_jsonl, run_script

pytestmark = pytest.mark.slow  # end-to-end runs of the recipe (in-process or through run.sh)
RECIPE = REPO / "cls" / "qlora"
DATA = REPO / "data" / "cls"
cls_qlora = load_recipe(RECIPE)



def test_classification_run_sh_beats_majority_and_matches_sklearn(tmp_path):
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

    out = tmp_path / "out"
    proc = run_script(RECIPE / "run.sh", f"--output_dir={out}", "--max_steps=40", "--lr=2e-3", "--log_every=1",
                      f"--predict_data_path={DATA / 'eval.jsonl'}", "--report_to=none")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    losses = [r["loss"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 40 and all(math.isfinite(x) for x in losses)
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3, losses  # falls (cross-entropy starts near ln 3)
    results = json.loads((out / "eval_results.json").read_text())
    assert results["accuracy"] > results["baseline_majority"]["accuracy"] + 0.3, results
    # eval_results.json agrees with scikit-learn on the predictions the run wrote for the same file
    truth = [r["label"] for r in read_jsonl(DATA / "eval.jsonl")]
    predicted = [r["prediction"] for r in read_jsonl(out / "predictions.jsonl")]
    labels = ["negative", "neutral", "positive"]
    assert results["accuracy"] == pytest.approx(accuracy_score(truth, predicted))
    assert results["macro_f1"] == pytest.approx(f1_score(truth, predicted, average="macro"))
    assert results["confusion_matrix"] == confusion_matrix(truth, predicted, labels=labels).tolist()
    assert all(abs(sum(r["probabilities"].values()) - 1) < 1e-5 for r in read_jsonl(out / "predictions.jsonl"))
    labels_json = json.loads((out / "final" / "labels.json").read_text())
    assert labels_json["labels"] == labels and labels_json["task"] == "classification"
    assert (out / "final" / "adapter_model.safetensors").is_file() and (out / "loss.png").is_file()


def test_regression_beats_mean_baseline_and_matches_scipy(tmp_path):
    from scipy.stats import pearsonr, spearmanr

    result = cls_qlora.main(cls_qlora.parse_config(cls_qlora.Config, [
        f"--output_dir={tmp_path}", "--task=regression", f"--data_path={DATA / 'regression_train.jsonl'}",
        f"--eval_data_path={DATA / 'regression_eval.jsonl'}", f"--predict_data_path={DATA / 'regression_eval.jsonl'}",
        "--max_steps=40", "--lr=2e-3", "--report_to=none", "--loss=huber"]))
    ev = result["eval"]
    assert ev["mse"] < 0.5 * ev["baseline_mean"]["mse"], ev
    truth = [r["label"] for r in read_jsonl(DATA / "regression_eval.jsonl")]
    predicted = [r["prediction"] for r in read_jsonl(tmp_path / "predictions.jsonl")]
    assert ev["mse"] == pytest.approx(np.mean((np.array(truth) - np.array(predicted)) ** 2), rel=1e-5)
    assert ev["pearson"] == pytest.approx(pearsonr(truth, predicted)[0], rel=1e-5)
    assert ev["spearman"] == pytest.approx(spearmanr(truth, predicted)[0], rel=1e-5)


def test_saved_adapter_reloads_and_reproduces_scores(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from common.data import collate_left_padded
    from common.model import PooledClassifier, load_model, resolve_model_path

    result = cls_qlora.main(cls_qlora.parse_config(cls_qlora.Config, [
        f"--output_dir={tmp_path}", "--max_steps=4", "--report_to=none", "--pooling=mean", "--class_weights=balanced",
        "--loss=focal"]))
    tok = result["tokenizer"]
    batch = collate_left_padded([{"input_ids": tok(t).input_ids + [tok.eos_token_id]}
                                 for t in ("The movie was great.", "这个酒店很糟糕。", "ok")], tok.pad_token_id)
    with torch.no_grad():
        in_memory = result["classifier"].eval()(**batch)
    labels = json.loads((result["final_dir"] / "labels.json").read_text())
    base = load_model(resolve_model_path("tiny"), "nf4", model_class=AutoModelForSequenceClassification,
                      num_labels=len(labels["labels"]))
    reloaded = PooledClassifier(PeftModel.from_pretrained(base, result["final_dir"]), labels["pooling"]).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch), in_memory, atol=1e-5, rtol=0)
    assert labels["pooling"] == "mean"


@pytest.mark.parametrize("eval_line,needle", [
    ('{"text": "fine", "label": "great"}', "field 'label' is 'great', not one of the training labels"),
    ('{"text": "fine"}', "missing field 'label'"),
    ('{"text": 3, "label": "neutral"}', "field 'text' must be a string, got int"),
])
def test_bad_eval_record_is_one_clear_line(tmp_path, eval_line, needle):
    bad = tmp_path / "eval.jsonl"
    bad.write_text('{"text": "fine", "label": "neutral"}\n' + eval_line + "\n")
    proc = run_script(RECIPE / "run.sh", f"--eval_data_path={bad}", f"--output_dir={tmp_path / 'out'}", "--max_steps=1")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"error: {bad}:2: {needle}" + (
        " ['negative', 'neutral', 'positive']" if "training labels" in needle else "")


def test_regression_label_must_be_a_number(tmp_path):
    bad = tmp_path / "train.jsonl"
    bad.write_text('{"text": "a", "label": 1.5}\n{"text": "b", "label": "high"}\n')
    proc = run_script(RECIPE / "run.sh", "--task=regression", f"--data_path={bad}", "--eval_data_path=",
                      f"--output_dir={tmp_path / 'out'}")
    assert proc.returncode == 2
    assert f"error: {bad}:2: field 'label' must be a number for regression, got 'high'" in proc.stderr
