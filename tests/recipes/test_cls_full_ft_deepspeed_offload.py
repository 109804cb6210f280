"""cls/full-ft-deepspeed-offload end to end on CPU with the tiny model: every weight and the score head trained
under DeepSpeed ZeRO-2 with DeepSpeedCPUAdam, ZeRO-3 with the weights offloaded too, and the deepspeed launcher."""
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import REPO, load_recipe, read_jsonl, run_script

pytestmark = pytest.mark.slow  # end-to-end runs of the recipe (in-process or through run.sh)
RECIPE = REPO / "cls" / "full-ft-deepspeed-offload"
DATA = REPO / "data" / "cls"
cls_full_ft = load_recipe(RECIPE)
LABELS = ["negative", "neutral", "positive"]

# DeepSpeedCPUAdam is compiled with gcc on first use (60-90 s); share the build with run.sh's default location
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))



def run_main(out, *args):
    return cls_full_ft.main(cls_full_ft.parse_config(cls_full_ft.Config, [f"--output_dir={out}", "--report_to=none",
                                                                          *args]))


def reload_scores(final_dir: Path, texts: list[str]) -> torch.Tensor:
    """Scores of texts from the saved final/ alone, read the way labels.json says (EOS appended, pooling)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from common.data import collate_left_padded
    from common.model import PooledClassifier

    info = json.loads((final_dir / "labels.json").read_text())
    tok = AutoTokenizer.from_pretrained(final_dir)
    model = AutoModelForSequenceClassification.from_pretrained(final_dir, local_files_only=True)
    classifier = PooledClassifier(model, info["pooling"]).eval()
    eos = [tok.eos_token_id] if info["append_eos"] else []
    batch = collate_left_padded([{"input_ids": tok(t).input_ids + eos} for t in texts], tok.pad_token_id)
    with torch.no_grad():
        return classifier(**batch)


def test_classification_run_sh_beats_majority_matches_sklearn_and_reloads(tmp_path):
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

    out = tmp_path / "out"
    proc = run_script(RECIPE / "run.sh", f"--output_dir={out}", "--max_steps=50", "--lr=1e-4", "--log_every=1",
                      f"--predict_data_path={DATA / 'eval.jsonl'}", "--report_to=none")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "zero     stage 2, optimizer offloaded to CPU | DeepSpeedCPUAdam" in proc.stdout
    losses = [r["loss"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 50 and all(math.isfinite(x) for x in losses)
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3, losses  # falls (cross-entropy starts near ln 3)
    results = json.loads((out / "eval_results.json").read_text())
    assert results["accuracy"] > results["baseline_majority"]["accuracy"] + 0.2, results
    truth = [r["label"] for r in read_jsonl(DATA / "eval.jsonl")]
    predictions = read_jsonl(out / "predictions.jsonl")
    predicted = [r["prediction"] for r in predictions]
    assert results["accuracy"] == pytest.approx(accuracy_score(truth, predicted))
    assert results["macro_f1"] == pytest.approx(f1_score(truth, predicted, average="macro"))
    assert results["confusion_matrix"] == confusion_matrix(truth, predicted, labels=LABELS).tolist()
    # final/ is a whole Hugging Face classifier: from_pretrained alone gives the probabilities the run wrote
    final = out / "final"
    assert json.loads((final / "labels.json").read_text())["labels"] == LABELS
    assert json.loads((final / "config.json").read_text())["id2label"] == dict(zip(["0", "1", "2"], LABELS))
    texts = [r["text"] for r in read_jsonl(DATA / "eval.jsonl")[:8]]
    probabilities = torch.softmax(reload_scores(final, texts), -1)
    written = torch.tensor([[r["probabilities"][name] for name in LABELS] for r in predictions[:8]])
    torch.testing.assert_close(probabilities, written, atol=1e-5, rtol=0)


def test_regression_under_zero3_with_offloaded_weights(tmp_path):
    """ZeRO-3 partitions the weights: the final save must gather them whole (predictions.jsonl, written by the
    partitioned engine, equals what the reloaded final/ predicts), and the regression beats the mean baseline."""
    from scipy.stats import pearsonr

    result = run_main(tmp_path, "--task=regression", "--zero_stage=3", "--offload_params",
                      f"--data_path={DATA / 'regression_train.jsonl'}",
                      f"--eval_data_path={DATA / 'regression_eval.jsonl'}",
                      f"--predict_data_path={DATA / 'regression_eval.jsonl'}", "--max_steps=60", "--lr=1e-4",
                      "--head_lr=3e-3", "--loss=huber")
    ev = result["eval"]
    assert ev["mse"] < 0.5 * ev["baseline_mean"]["mse"], ev
    truth = [r["label"] for r in read_jsonl(DATA / "regression_eval.jsonl")]
    predicted = [r["prediction"] for r in read_jsonl(tmp_path / "predictions.jsonl")]
    assert ev["mse"] == pytest.approx(np.mean((np.array(truth) - np.array(predicted)) ** 2), rel=1e-5)
    assert ev["pearson"] == pytest.approx(pearsonr(truth, predicted)[0], rel=1e-5)
    texts = [r["text"] for r in read_jsonl(DATA / "regression_eval.jsonl")[:8]]
    torch.testing.assert_close(reload_scores(result["final_dir"], texts)[:, 0], torch.tensor(predicted[:8]),
                               atol=1e-4, rtol=0)


def test_resume_continues_exactly(tmp_path):
    import shutil

    args = ["--max_steps=6", "--save_every=3", "--eval_data_path=", "--log_every=1"]
    straight = run_main(tmp_path / "a", *args)
    run_main(tmp_path / "b", *args)
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step_00000006")
    resumed = run_main(tmp_path / "b", *args, "--resume")
    assert resumed["steps"] == 3
    assert resumed["losses"] == pytest.approx(straight["losses"][3:], abs=1e-6)


@pytest.mark.skipif(os.cpu_count() < 2, reason="two processes need two cores")
def test_two_processes_under_zero3_score_every_eval_text_once(tmp_path):
    """120 eval texts in 8 batches of 16 split 4/4, predict texts in 1 batch: one rank has nothing to score but must
    still join every ZeRO-3 forward; every text is scored once and the files keep the input order."""
    from common.runtime import free_port

    out = tmp_path / "out"
    predict = tmp_path / "predict.jsonl"
    predict.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in read_jsonl(DATA / "eval.jsonl")[:5]))
    proc = run_script(RECIPE / "run.sh", f"--output_dir={out}", "--max_steps=2", "--report_to=none", "--zero_stage=3",
                      f"--predict_data_path={predict}", env_extra={"NGPU": "2", "MASTER_PORT": str(free_port())})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "deepspeed launcher, 2 processes" in proc.stdout
    results = json.loads((out / "eval_results.json").read_text())
    assert sum(map(sum, results["confusion_matrix"])) == 120
    rows = read_jsonl(out / "predictions.jsonl")
    assert [r["text"] for r in rows] == [json.loads(line)["text"] for line in predict.read_text().splitlines()]
    assert all(abs(sum(r["probabilities"].values()) - 1) < 1e-5 for r in rows)


def test_nan_loss_stops_before_the_update_with_the_real_gradient_norm(tmp_path, monkeypatch):
    """A nan loss in step 2 (its second micro-batch): every rank stops after the step's last backward, before
    engine.step(), and the error gives the gradient norm DeepSpeed would have clipped (inf), not a placeholder."""
    from common.losses import NonFiniteLoss

    real, calls = cls_full_ft.cls_loss_sum, []

    def nan_in_step_2(*args):
        calls.append(1)
        value = real(*args)
        return value * float("nan") if len(calls) == 4 else value

    monkeypatch.setattr(cls_full_ft, "cls_loss_sum", nan_in_step_2)
    with pytest.raises(NonFiniteLoss, match=r"^step 2: loss nan, gradient norm inf; stopped before updating the "
                                            r"weights \(last checkpoint: .*step_00000001\)"):
        run_main(tmp_path, "--max_steps=3", "--grad_accum=2", "--save_every=1", "--eval_data_path=", "--batch_size=4")
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000001"]


def test_bad_label_is_one_clear_line(tmp_path):
    bad = tmp_path / "eval.jsonl"
    bad.write_text('{"text": "fine", "label": "neutral"}\n{"text": "fine", "label": "great"}\n')
    proc = run_script(RECIPE / "run.sh", f"--eval_data_path={bad}", f"--output_dir={tmp_path / 'out'}", "--max_steps=1")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (f"error: {bad}:2: field 'label' is 'great', not one of the "
                                                    f"training labels {LABELS}")
