"""Pooling, classification / regression / pairwise losses and metrics, checked against torch, scikit-learn, scipy."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common.data import Record, build_cls_examples, build_preference_examples, collate_left_padded, label_set
from common.losses import classification_loss_sum, pairwise_loss_sum, regression_loss_sum
from common.metrics import (balanced_class_weights, classification_metrics, majority_baseline, mean_baseline,
                            pairwise_metrics, regression_metrics)
from common.model import PooledClassifier, pool_hidden


def test_pooling_on_left_padded_rows():
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float).view(2, 4, 3)
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert pool_hidden(hidden, mask, "last").tolist() == hidden[:, -1].tolist()
    torch.testing.assert_close(pool_hidden(hidden, mask, "mean")[0], hidden[0, 2:].mean(0))
    torch.testing.assert_close(pool_hidden(hidden, mask, "mean")[1], hidden[1].mean(0))
    with pytest.raises(ValueError):
        pool_hidden(hidden, mask, "max")


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_classifier_scores_do_not_depend_on_padding(tiny_dir, tokenizer, pooling):
    from transformers import AutoModelForSequenceClassification

    from common.model import load_model

    torch.manual_seed(0)
    model = load_model(tiny_dir, "none", model_class=AutoModelForSequenceClassification, num_labels=3).eval()
    clf = PooledClassifier(model, pooling)
    rows = [{"input_ids": tokenizer(t).input_ids} for t in ("short", "a much longer text than the other one")]
    with torch.no_grad():
        together = clf(**collate_left_padded(rows, tokenizer.pad_token_id))
        for i, row in enumerate(rows):
            alone = clf(**collate_left_padded([row], tokenizer.pad_token_id))
            torch.testing.assert_close(together[i], alone[0], atol=1e-5, rtol=0)


def test_losses_match_torch():
    logits, labels = torch.randn(6, 3), torch.tensor([0, 1, 2, 2, 1, 0])
    assert classification_loss_sum(logits, labels).item() == pytest.approx(F.cross_entropy(logits, labels, reduction="sum").item(), rel=1e-6)
    assert classification_loss_sum(logits, labels, label_smoothing=0.1).item() == pytest.approx(
        F.cross_entropy(logits, labels, reduction="sum", label_smoothing=0.1).item(), rel=1e-6)
    # focal with gamma 0 is cross-entropy; gamma > 0 only lowers it
    assert classification_loss_sum(logits, labels, "focal", focal_gamma=0.0).item() == pytest.approx(
        classification_loss_sum(logits, labels).item(), rel=1e-6)
    assert classification_loss_sum(logits, labels, "focal", focal_gamma=2.0) < classification_loss_sum(logits, labels)
    weights = torch.tensor([1.0, 2.0, 0.5])
    expected = (F.cross_entropy(logits, labels, reduction="none") * weights[labels]).sum()
    torch.testing.assert_close(classification_loss_sum(logits, labels, class_weights=weights), expected)
    pred, target = torch.tensor([1.0, 2.0, 5.0]), torch.tensor([1.5, 2.0, 2.0])
    assert regression_loss_sum(pred, target).item() == pytest.approx(0.25 + 9.0)
    assert regression_loss_sum(pred, target, "huber").item() == pytest.approx(0.125 + 2.5)
    assert pairwise_loss_sum(torch.tensor([2.0]), torch.tensor([0.0])).item() == pytest.approx(-np.log(1 / (1 + np.exp(-2))))


def test_metrics_match_sklearn_and_scipy():
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.utils.class_weight import compute_class_weight

    y_true, y_pred = [0, 1, 2, 2, 1, 0, 2], [0, 2, 2, 2, 1, 1, 0]
    m = classification_metrics(y_true, y_pred, ["a", "b", "c"])
    assert m["accuracy"] == accuracy_score(y_true, y_pred)
    assert m["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro"))
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 1, 1], [1, 0, 2]] and m["per_class"]["c"]["support"] == 3
    assert majority_baseline([2, 2, 1], y_true, 3)["accuracy"] == pytest.approx(3 / 7)
    assert balanced_class_weights([0, 0, 0, 1], 2) == pytest.approx(compute_class_weight("balanced", classes=np.array([0, 1]), y=np.array([0, 0, 0, 1])))
    t, p = [1.0, 2.0, 3.0, 4.5], [1.2, 1.9, 3.5, 4.0]
    r = regression_metrics(t, p)
    assert r["pearson"] == pytest.approx(pearsonr(t, p)[0]) and r["spearman"] == pytest.approx(spearmanr(t, p)[0])
    assert r["mse"] == pytest.approx(np.mean((np.array(t) - np.array(p)) ** 2))
    assert mean_baseline([1.0, 3.0], [2.0, 4.0])["mse"] == pytest.approx(2.0)
    assert pairwise_metrics([1.0, 0.0, 3.0], [0.0, 1.0, 2.0])["pairwise_accuracy"] == pytest.approx(2 / 3)


def test_cls_examples_and_labels(tokenizer):
    recs = [Record({"text": "good", "label": "pos"}, "f:1"), Record({"text": "bad", "label": "neg"}, "f:2")]
    labels = label_set(recs, "label")
    assert labels == ["neg", "pos"]
    examples, _ = build_cls_examples(recs, tokenizer, 64, "classification", labels)
    assert [e["label"] for e in examples] == [1, 0]
    assert examples[0]["input_ids"][0] == tokenizer.bos_token_id and examples[0]["input_ids"][-1] == tokenizer.eos_token_id
    long = [Record({"text": "word " * 50, "label": "pos"}, "f:1")]
    (ex,), stats = build_cls_examples(long, tokenizer, 10, "classification", labels)
    assert len(ex["input_ids"]) == 10 and ex["input_ids"][-1] == tokenizer.eos_token_id and stats.truncated_examples == 1
    from common.data import DataError

    with pytest.raises(DataError, match="^f: field 'label' has 1 distinct value"):
        label_set(recs[:1], "label")
    with pytest.raises(DataError, match="mixes string and integer labels"):
        label_set(recs + [Record({"text": "x", "label": 3}, "f:3")], "label")


def test_preference_pairs_end_with_eos_even_when_pad_is_eos(tokenizer):
    """The known reward-model failure: with pad == EOS, pooling at 'the first pad' scores chosen and rejected alike.
    Left padding plus pooling at the last column reads each response's own final EOS."""
    recs = [Record({"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "I don't know."}, "p:1")]
    (pair,), _ = build_preference_examples(recs, tokenizer, 128)
    assert pair["chosen_ids"][-1] == pair["rejected_ids"][-1] == tokenizer.eos_token_id
    assert pair["chosen_ids"] != pair["rejected_ids"]
    batch = collate_left_padded([{"input_ids": pair["chosen_ids"]}, {"input_ids": pair["rejected_ids"]}],
                                pad_id=tokenizer.eos_token_id)  # pad == EOS on purpose
    hidden = torch.randn(2, batch["input_ids"].shape[1], 4)
    pooled = pool_hidden(hidden, batch["attention_mask"], "last")
    assert not torch.equal(pooled[0], pooled[1])
    from common.data import DataError

    with pytest.raises(DataError, match="p:2: fields 'chosen' and 'rejected' are identical"):
        build_preference_examples([Record({"prompt": "q", "chosen": "a", "rejected": "a"}, "p:2")], tokenizer, 64)
