"""Evaluation metrics (scikit-learn / scipy underneath), returned as plain JSON-ready dicts."""
import numpy as np


def classification_metrics(y_true, y_pred, label_names: list[str]) -> dict:
    from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, f1_score

    ids = list(range(len(label_names)))
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=ids, average="macro", zero_division=0)),
        "per_class": classification_report(y_true, y_pred, labels=ids, target_names=label_names, output_dict=True,
                                           zero_division=0),
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=ids).tolist(),  # rows: true, columns: predicted
    }


def majority_baseline(train_labels, eval_labels, n_classes: int) -> dict:
    """Accuracy and macro-F1 of always predicting the most frequent training class."""
    from sklearn.metrics import accuracy_score, f1_score

    majority = int(np.bincount(train_labels, minlength=n_classes).argmax())
    pred = [majority] * len(eval_labels)
    return {"accuracy": float(accuracy_score(eval_labels, pred)),
            "macro_f1": float(f1_score(eval_labels, pred, labels=list(range(n_classes)), average="macro",
                                       zero_division=0))}


def regression_metrics(y_true, y_pred) -> dict:
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import mean_absolute_error, mean_squared_error

    y_true, y_pred = np.asarray(y_true, dtype=float), np.asarray(y_pred, dtype=float)
    constant = np.ptp(y_pred) == 0 or np.ptp(y_true) == 0  # correlation is undefined for a constant
    return {"mse": float(mean_squared_error(y_true, y_pred)), "mae": float(mean_absolute_error(y_true, y_pred)),
            "pearson": float("nan") if constant else float(pearsonr(y_true, y_pred)[0]),
            "spearman": float("nan") if constant else float(spearmanr(y_true, y_pred)[0])}


def mean_baseline(train_targets, eval_targets) -> dict:
    """MSE and MAE of always predicting the training mean."""
    from sklearn.metrics import mean_absolute_error, mean_squared_error

    pred = [float(np.mean(train_targets))] * len(eval_targets)
    return {"mse": float(mean_squared_error(eval_targets, pred)), "mae": float(mean_absolute_error(eval_targets, pred))}


def pairwise_metrics(chosen_rewards, rejected_rewards) -> dict:
    chosen, rejected = np.asarray(chosen_rewards, dtype=float), np.asarray(rejected_rewards, dtype=float)
    return {"pairwise_accuracy": float(np.mean(chosen > rejected)), "mean_margin": float(np.mean(chosen - rejected)),
            "pairs": int(len(chosen))}


def balanced_class_weights(train_labels, n_classes: int) -> list[float]:
    """n_samples / (n_classes * count_c), as scikit-learn's 'balanced' class weights."""
    counts = np.bincount(train_labels, minlength=n_classes)
    return [float(len(train_labels) / (n_classes * c)) if c else 0.0 for c in counts]
