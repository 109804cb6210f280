"""tools/evaluate.py: SFT loss equals an independent computation on the same examples, exact match compares stripped
greedy answers, classification and regression metrics equal scikit-learn's / scipy's on the predictions."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import REPO
from tests.tools.conftest import load_tool, train

pytestmark = pytest.mark.slow  # every test scores adapters the recipes trained in-process (conftest fixtures)
evaluate = load_tool("evaluate")
generate = load_tool("generate")
SFT_EVAL = REPO / "data" / "sft" / "eval.jsonl"


@pytest.fixture(scope="module")
def sft_records_file(tmp_path_factory):
    """Six records of the bundled SFT eval data: alpaca records with and without input."""
    path = tmp_path_factory.mktemp("sft") / "eval6.jsonl"
    path.write_text("".join(SFT_EVAL.read_text().splitlines(keepends=True)[:6]))
    return path


def test_sft_loss_equals_an_independent_computation(sft_adapter, sft_records_file, tiny_dir, tokenizer, capsys):
    from peft import PeftModel

    from common.data import build_sft_examples, read_records
    from common.model import load_model

    results = evaluate.main(["--model=tiny", f"--adapter={sft_adapter}", f"--data={sft_records_file}",
                             "--exact_match=false", "--batch_size=4"])
    assert results["task"] == "sft" and results["examples"] == 6 and "exact_match" not in results
    assert json.loads(capsys.readouterr().out) == results
    # the same examples, one at a time and unpadded, cross-entropy on the answer tokens written out by hand
    model = PeftModel.from_pretrained(load_model(tiny_dir), str(sft_adapter)).eval()
    examples, _ = build_sft_examples(read_records(sft_records_file), tokenizer, 1024)
    total, count = 0.0, 0
    with torch.no_grad():
        for e in examples:
            logits = model(input_ids=torch.tensor([e["input_ids"]])).logits[0]
            targets = torch.tensor(e["labels"][1:])
            answer = targets != -100
            total += F.cross_entropy(logits[:-1][answer], targets[answer], reduction="sum").item()
            count += int(answer.sum())
    assert results["answer_tokens"] == count
    assert results["loss"] == pytest.approx(total / count, rel=1e-5)
    assert results["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)


def test_sft_exact_match_compares_stripped_greedy_answers(merged_sft, sft_records_file, tmp_path):
    answers = tmp_path / "answers.jsonl"
    generate.main([f"--model={merged_sft}", f"--prompts={sft_records_file}", f"--out={answers}",
                   "--max_new_tokens=6"])
    greedy = [json.loads(line)["output"] for line in answers.read_text().splitlines()]
    records = [json.loads(line) for line in sft_records_file.read_text().splitlines()]
    for i, record in enumerate(records):  # the first two references are the model's own answer, padded with spaces
        record["output"] = f"  {greedy[i]}\n" if i < 2 else f"not {greedy[i]}"
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    results = evaluate.main([f"--model={merged_sft}", f"--data={data}", "--max_new_tokens=6",
                             f"--out={tmp_path / 'results.json'}", f"--predictions={tmp_path / 'predictions.jsonl'}"])
    assert (results["exact_match"], results["exact_match_count"], results["answered"]) == (2 / 6, 2, 6)
    assert json.loads((tmp_path / "results.json").read_text()) == results
    predictions = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert [p["output"] for p in predictions] == greedy
    assert [p["exact_match"] for p in predictions] == [True, True, False, False, False, False]


def read_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_classification_metrics_equal_scikit_learn_on_the_predictions(cls_adapter, merged_cls, tmp_path, tiny_dir,
                                                                       tokenizer):
    from peft import PeftModel
    from sklearn.metrics import accuracy_score, f1_score
    from transformers import AutoModelForSequenceClassification

    from common.model import PooledClassifier, load_model

    data = REPO / "data" / "cls" / "eval.jsonl"
    predictions = tmp_path / "predictions.jsonl"
    results = evaluate.main(["--model=tiny", f"--adapter={cls_adapter}", f"--data={data}",
                             f"--predictions={predictions}"])
    assert results["task"] == "classification" and results["examples"] == 120
    rows = read_lines(predictions)
    truth, predicted = [r["label"] for r in read_lines(data)], [r["prediction"] for r in rows]
    assert [r["label"] for r in rows] == truth
    assert results["accuracy"] == pytest.approx(accuracy_score(truth, predicted), abs=1e-12)
    assert results["macro_f1"] == pytest.approx(f1_score(truth, predicted, average="macro", zero_division=0), abs=1e-12)
    assert sum(map(sum, results["confusion_matrix"])) == 120
    # the predictions themselves: a few texts scored alone (no padding) through base + adapter
    base = load_model(tiny_dir, model_class=AutoModelForSequenceClassification, num_labels=3)
    classifier = PooledClassifier(PeftModel.from_pretrained(base, str(cls_adapter)).eval(), "last")
    for record, row in list(zip(read_lines(data), rows))[:5]:
        ids = torch.tensor([tokenizer(record["text"]).input_ids + [tokenizer.eos_token_id]])
        with torch.no_grad():
            scores = classifier(ids, torch.ones_like(ids), torch.arange(ids.shape[1])[None])[0]
        assert results["labels"][int(scores.argmax())] == row["prediction"]
    # the merged model (labels.json in its own folder) predicts the same
    merged = evaluate.main([f"--model={merged_cls}", f"--data={data}", f"--predictions={tmp_path / 'merged.jsonl'}"])
    assert [r["prediction"] for r in read_lines(tmp_path / "merged.jsonl")] == predicted
    assert merged["accuracy"] == results["accuracy"]


def test_regression_metrics_equal_scipy_on_the_predictions(tmp_path_factory, tmp_path):
    from scipy.stats import pearsonr
    from sklearn.metrics import mean_squared_error

    adapter = train("cls/qlora", tmp_path_factory.mktemp("reg") / "out", "--task=regression", "--lr=1e-2",
                    "--lora_r=8", f"--data_path={REPO / 'data' / 'cls' / 'regression_train.jsonl'}")
    data = REPO / "data" / "cls" / "regression_eval.jsonl"
    predictions = tmp_path / "predictions.jsonl"
    results = evaluate.main(["--model=tiny", f"--adapter={adapter}", f"--data={data}", "--task=auto",
                             f"--predictions={predictions}"])
    rows = read_lines(predictions)
    truth, predicted = [r["label"] for r in read_lines(data)], [r["prediction"] for r in rows]
    assert results["task"] == "regression"
    assert results["mse"] == pytest.approx(mean_squared_error(truth, predicted), rel=1e-9)
    assert results["loss"] == pytest.approx(results["mse"], rel=1e-5)
    assert results["pearson"] == pytest.approx(pearsonr(truth, predicted)[0], rel=1e-9)


def test_a_task_the_model_was_not_trained_for_is_refused(sft_adapter, cls_adapter, capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--model=tiny", f"--adapter={sft_adapter}", f"--data={SFT_EVAL}", "--task=classification"])
    assert exit_info.value.code == 2
    assert "--task=classification needs the labels.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.main(["--model=tiny", f"--adapter={cls_adapter}", f"--data={SFT_EVAL}", "--task=sft"])
    assert "labels.json says the model was trained for classification" in capsys.readouterr().err
