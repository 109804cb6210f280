"""common/cls_eval.py: scores come back in input order whatever the batching, eval metrics equal scikit-learn's and
a hand-written loss, prediction rows, the user errors of --loss / --class_weights, the eval log lines, the pairwise
eval, and the data report of the start-up block and --inspect_data. In-process, with small stand-in models."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common.cls_eval import (
    ClsLoss,
    data_report,
    eval_metrics,
    evaluate_pairs,
    log_eval,
    log_pairwise_eval,
    parse_class_weights,
    prediction_rows,
    resolve_loss_name,
    score_examples,
    score_pairs,
)
from common.config import UserError
from common.data import DataStats
from common.runtime import Runtime


class IdScorer(torch.nn.Module):
    """A stand-in classifier: row scores (sum of the row's real token ids, count of real tokens, first real id),
    from the left-padded batch; `model` mimics PooledClassifier's backbone for input_device."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1))
        self.calls = 0

    def forward(self, input_ids, attention_mask, position_ids):
        self.calls += 1
        assert not self.training  # scored in eval mode
        first = input_ids.gather(1, (attention_mask.shape[1] - attention_mask.sum(-1, keepdim=True)))[:, 0]
        rows = [(input_ids * attention_mask).sum(-1), attention_mask.sum(-1), first]
        return torch.stack(rows, -1).float() * self.weight


def examples_of(lengths):
    return [{"input_ids": [10 * i + j + 1 for j in range(n)], "label": i % 3, "text": f"t{i}"}
            for i, n in enumerate(lengths)]


def test_scores_come_back_in_input_order_whatever_the_batching():
    model = IdScorer().train()
    examples = examples_of([5, 1, 9, 3, 3, 7, 2])
    expected = torch.tensor([[sum(e["input_ids"]), len(e["input_ids"]), e["input_ids"][0]] for e in examples],
                            dtype=torch.float)
    for batch_size in (1, 2, 3, 16):
        torch.testing.assert_close(score_examples(model, examples, 3, batch_size, 0, torch.device("cpu")), expected)
    assert model.training  # back in the mode it had
    # lockstep with one rank: the same forwards, the same scores
    model.calls = 0
    rt = Runtime(torch.device("cpu"))
    scores = score_examples(model, examples, 3, 2, 0, torch.device("cpu"), rt, lockstep=True)
    torch.testing.assert_close(scores, expected)
    assert model.calls == 4


def test_eval_metrics_equal_scikit_learn_and_a_hand_written_loss():
    from sklearn.metrics import accuracy_score, f1_score

    scores = torch.tensor([[2.0, 0.1, 0.0], [0.0, 1.0, 0.5], [0.3, 0.2, 0.9], [1.5, 0.0, 0.2], [0.0, 0.0, 3.0]])
    examples = [{"label": y} for y in (0, 2, 2, 1, 2)]
    weights = torch.tensor([1.0, 2.0, 0.5])
    loss = ClsLoss("classification", "ce", class_weights=weights)
    metrics = eval_metrics(scores, examples, loss, ["a", "b", "c"], train_targets=[1, 1, 1, 0])
    targets = torch.tensor([0, 2, 2, 1, 2])
    by_hand = (F.cross_entropy(scores, targets, reduction="none") * weights[targets]).sum().item() / 5
    assert metrics["eval_loss"] == pytest.approx(by_hand, rel=1e-6)
    predicted = [0, 1, 2, 0, 2]
    assert metrics["accuracy"] == accuracy_score(targets.tolist(), predicted)
    assert metrics["macro_f1"] == pytest.approx(f1_score(targets.tolist(), predicted, average="macro"))
    assert metrics["baseline_majority"]["accuracy"] == pytest.approx(1 / 5)  # always class 1
    regression = eval_metrics(torch.tensor([[1.0], [2.5], [2.0]]), [{"label": 1.0}, {"label": 2.0}, {"label": 4.0}],
                              ClsLoss("regression", "mse"), ["score"], train_targets=[3.0, 3.0])
    assert regression["eval_loss"] == pytest.approx((0 + 0.25 + 4) / 3) == regression["mse"]
    assert regression["baseline_mean"]["mse"] == pytest.approx((4 + 1 + 1) / 3)


def test_prediction_rows_name_classes_as_the_training_data_did():
    scores = torch.tensor([[0.0, 2.0], [1.0, -1.0]])
    examples = [{"text": "x", "label": 0}, {"text": "y", "label": 1}]
    rows = prediction_rows(examples, scores, "classification", [3, 7], "body")
    assert [r["prediction"] for r in rows] == [7, 3] and rows[0]["body"] == "x" and "label" not in rows[0]
    assert rows[0]["probabilities"]["7"] == pytest.approx(1 / (1 + math.exp(-2)))
    with_label = prediction_rows(examples, scores, "classification", ["neg", "pos"], with_label=True)
    assert [(r["label"], r["prediction"]) for r in with_label] == [("neg", "pos"), ("pos", "neg")]
    numbers = prediction_rows([{"text": "z", "label": 2.5}], torch.tensor([[1.25]]), "regression", None,
                              with_label=True)
    assert numbers == [{"text": "z", "label": 2.5, "prediction": 1.25}]


def test_loss_and_class_weight_options():
    from sklearn.utils.class_weight import compute_class_weight

    assert resolve_loss_name("auto", "classification") == "ce" and resolve_loss_name("auto", "regression") == "mse"
    with pytest.raises(UserError, match=r"^--loss=huber does not fit --task=classification$"):
        resolve_loss_name("huber", "classification")
    targets = [0, 0, 0, 1, 2, 2]
    balanced = parse_class_weights("balanced", targets, ["a", "b", "c"])
    sklearn = compute_class_weight("balanced", classes=np.array([0, 1, 2]), y=np.array(targets))
    torch.testing.assert_close(balanced, torch.tensor(sklearn, dtype=torch.float))
    assert parse_class_weights("1,2.5,1", targets, ["a", "b", "c"]).tolist() == [1.0, 2.5, 1.0]
    assert parse_class_weights("none", targets, ["a", "b", "c"]) is None
    assert parse_class_weights("balanced", [1.5, 2.0], None) is None  # regression: no classes
    with pytest.raises(UserError, match=r"--class_weights has 2 values for 3 classes \['a', 'b', 'c'\]"):
        parse_class_weights("1,2", targets, ["a", "b", "c"])


class Recorder:
    def __init__(self):
        self.rows, self.lines = [], []

    def log(self, step, values, echo=True):
        self.rows.append((step, values))

    def info(self, text):
        self.lines.append(text)


def test_eval_log_lines():
    log = Recorder()
    log_eval(log, 3, 10, {"eval_loss": 0.5, "accuracy": 0.75, "macro_f1": 0.5, "per_class": {}}, "classification")
    log_pairwise_eval(log, 10, 10, {"eval_loss": 0.25, "pairwise_accuracy": 1.0, "mean_margin": 0.125})
    assert log.lines == ["step 3/10 | eval_loss 0.5000 | accuracy 0.7500 | macro_f1 0.5000",
                         "step 10/10 | eval_loss 0.2500 | pairwise accuracy 1.0000 | mean margin 0.125"]
    assert log.rows[0] == (3, {"eval_loss": 0.5, "eval_accuracy": 0.75, "eval_macro_f1": 0.5})
    assert log.rows[1] == (10, {"eval_loss": 0.25, "eval_pairwise_accuracy": 1.0, "eval_mean_margin": 0.125})


class Backbone(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(1, 1)

    def get_input_embeddings(self):
        return self.embed


class LengthReward(torch.nn.Module):
    """A stand-in reward model: one reward per row, its number of real tokens."""

    def __init__(self):
        super().__init__()
        self.model = Backbone()

    def forward(self, input_ids, attention_mask, position_ids):
        return attention_mask.sum(-1, keepdim=True).float()


def test_pairs_are_scored_side_by_side_and_evaluated():
    pairs = [{"chosen_ids": [1, 2, 3], "rejected_ids": [1]}, {"chosen_ids": [1], "rejected_ids": [4, 5]},
             {"chosen_ids": [7, 8], "rejected_ids": [9]}]
    chosen, rejected = score_pairs(LengthReward(), pairs, 0, torch.device("cpu"))
    assert chosen.tolist() == [3, 1, 2] and rejected.tolist() == [1, 2, 1]
    metrics = evaluate_pairs(LengthReward(), pairs, 2, 0, Runtime(torch.device("cpu")))
    margins = torch.tensor([2.0, -1.0, 1.0])
    assert metrics["eval_loss"] == pytest.approx(-F.logsigmoid(margins).mean().item())
    assert metrics["pairwise_accuracy"] == pytest.approx(2 / 3) and metrics["pairs"] == 3
    assert metrics["mean_margin"] == pytest.approx(2 / 3)


def test_data_report_counts_labels_and_shows_an_example(tokenizer):
    examples = [{"input_ids": tokenizer("good film").input_ids + [tokenizer.eos_token_id], "label": 2},
                {"input_ids": [5, 6, 7], "label": 0}, {"input_ids": [5, 6], "label": 2}]
    stats = DataStats(examples=3, tokens=sum(len(e["input_ids"]) for e in examples))
    lines = data_report({"train": ("t.jsonl", examples, stats), "eval": ("", [], None)}, tokenizer,
                        "classification", ["neg", "neu", "pos"])
    assert len(lines) == 2 and lines[0].startswith("data     train t.jsonl: 3 examples")
    assert lines[0].endswith(f"| lengths 2-{len(examples[0]['input_ids'])} tokens (median 3) | labels neg 1, neu 0, "
                             "pos 2")
    assert lines[1] == f"example  {tokenizer.decode(examples[0]['input_ids'])!r} -> 'pos'"
    regression = data_report({"train": ("r.jsonl", [{"input_ids": [5], "label": 1.5}, {"input_ids": [6], "label": 4}],
                                         stats)}, tokenizer, "regression", None)
    assert "| targets 1.5 to 4 (mean 2.75)" in regression[0] and regression[1].endswith("-> 1.5")
    pairs = [{"chosen_ids": [5, 6, 7], "rejected_ids": [5]}]
    pair_lines = data_report({"train": ("p.jsonl", pairs, DataStats(examples=1, tokens=4))}, tokenizer, "pairwise",
                             None)
    assert pair_lines[0].startswith("data     train p.jsonl: 1 pairs, 4 tokens")
    assert "chosen lengths 3-3 tokens" in pair_lines[0] and "rejected lengths 1-1 tokens" in pair_lines[0]
    assert pair_lines[1].startswith(f"example  chosen {tokenizer.decode([5, 6, 7])!r}")
