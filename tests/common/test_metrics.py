"""Classification / regression / pairwise metrics and baselines, checked against scikit-learn and scipy."""
import numpy as np
import pytest

from common.metrics import (
    balanced_class_weights,
    classification_metrics,
    majority_baseline,
    mean_baseline,
    pairwise_metrics,
    regression_metrics,
)


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
    sklearn_weights = compute_class_weight("balanced", classes=np.array([0, 1]), y=np.array([0, 0, 0, 1]))
    assert balanced_class_weights([0, 0, 0, 1], 2) == pytest.approx(sklearn_weights)
    t, p = [1.0, 2.0, 3.0, 4.5], [1.2, 1.9, 3.5, 4.0]
    r = regression_metrics(t, p)
    assert r["pearson"] == pytest.approx(pearsonr(t, p)[0]) and r["spearman"] == pytest.approx(spearmanr(t, p)[0])
    assert r["mse"] == pytest.approx(np.mean((np.array(t) - np.array(p)) ** 2))
    assert mean_baseline([1.0, 3.0], [2.0, 4.0])["mse"] == pytest.approx(2.0)
    assert pairwise_metrics([1.0, 0.0, 3.0], [0.0, 1.0, 2.0])["pairwise_accuracy"] == pytest.approx(2 / 3)
