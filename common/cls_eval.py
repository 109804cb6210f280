"""Scoring, evaluation and prediction for the cls recipes (classifiers, regressors, pairwise reward models) and
tools/evaluate.py: scores of every example gathered from all ranks, the loss the recipes train with, eval metrics
and baselines, the eval log line, predictions.jsonl rows, and the data report of the start-up block and
--inspect_data (label distribution, lengths, one example as the model sees it)."""
import contextlib
import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from common.config import UserError
from common.data import collate_left_padded, cut_middle, plan_batches
from common.losses import classification_loss_sum, pairwise_loss_sum, regression_loss_sum
from common.metrics import (
    balanced_class_weights,
    classification_metrics,
    majority_baseline,
    mean_baseline,
    pairwise_metrics,
    regression_metrics,
)

EVAL_KEYS = {"classification": ("accuracy", "macro_f1"), "regression": ("mse", "mae", "pearson", "spearman")}


@dataclass
class ClsLoss:
    """The loss a cls recipe trains with, and reports as eval_loss."""
    task: str  # classification or regression
    name: str = "ce"  # ce or focal (classification), mse or huber (regression)
    label_smoothing: float = 0.0  # cross-entropy label smoothing
    class_weights: torch.Tensor | None = None  # one weight per class, or None
    focal_gamma: float = 2.0  # focal loss focusing strength


def cls_loss_sum(scores: torch.Tensor, targets: torch.Tensor, loss: ClsLoss) -> torch.Tensor:
    """The loss summed over a batch: scores (rows x classes, or rows x 1 for regression) against class indices or
    numbers; the targets follow the scores to their device (the head's GPU under a layer split)."""
    targets = targets.to(scores.device)
    if loss.task == "regression":
        return regression_loss_sum(scores.squeeze(-1), targets, loss.name)
    return classification_loss_sum(scores, targets, loss.name, loss.label_smoothing, loss.class_weights,
                                   loss.focal_gamma)


def resolve_loss_name(option: str, task: str) -> str:
    """--loss: auto is ce for classification, mse for regression; a loss of the other task is an error."""
    name = option if option != "auto" else ("mse" if task == "regression" else "ce")
    if (name in ("mse", "huber")) != (task == "regression"):
        raise UserError(f"--loss={name} does not fit --task={task}")
    return name


def parse_class_weights(option: str, train_targets: list, classes: list | None) -> torch.Tensor | None:
    """--class_weights: none, balanced (inverse class frequency in the training data) or one weight per class."""
    if classes is None or option == "none":
        return None
    if option == "balanced":
        weights = balanced_class_weights(train_targets, len(classes))
    else:
        weights = [float(w) for w in option.split(",")]
    if len(weights) != len(classes):
        raise UserError(f"--class_weights has {len(weights)} values for {len(classes)} classes {classes}")
    return torch.tensor(weights)


def describe_loss(loss: ClsLoss, classes: list | None) -> str:
    """The start-up block's words for the loss: 'loss ce, 3 classes [...], class weights [...]'."""
    words = [f"loss {loss.name}"]
    if classes:
        words.append(f"{len(classes)} classes {classes}")
    if loss.class_weights is not None:
        words.append(f"class weights {[round(w, 3) for w in loss.class_weights.tolist()]}")
    return ", ".join(words)


def target_tensor(examples: list[dict], task: str) -> torch.Tensor:
    """The examples' labels as a tensor: class indices (long) or numbers (float)."""
    dtype = torch.float if task == "regression" else torch.long
    return torch.tensor([e["label"] for e in examples], dtype=dtype)


def input_device(model) -> torch.device:
    """Where a classifier's batch goes: its embedding's device (the first GPU of a layer split), under DDP too."""
    backbone = getattr(model, "module", model).model
    return backbone.get_input_embeddings().weight.device


def score_examples(model, examples: list[dict], width: int, batch_size: int, pad_id: int, device: torch.device,
                   rt=None, autocast=None, lockstep: bool = False) -> torch.Tensor:
    """Scores (`width` logits, or one number for regression) of every example in input order, on the CPU.

    The batches go to `device`; with a runtime `rt` each rank scores its share and the scores are summed over the
    ranks (each example was scored by exactly one rank; the others hold zeros there). lockstep: every rank runs as
    many forwards (ZeRO-3 gathers weights from all ranks in each one), a rank short of a batch runs the first one
    again and throws the result away. The model is in eval mode meanwhile, then back in the mode it had."""
    rank, world_size = (rt.rank, rt.world_size) if rt is not None else (0, 1)
    buffer_device = rt.device if rt is not None else torch.device("cpu")  # the one the all-reduce works on
    scores = torch.zeros(len(examples), width, device=buffer_device)
    batches = plan_batches([len(e["input_ids"]) for e in examples], batch_size, 0, 0, True)
    rounds = math.ceil(len(batches) / world_size) if lockstep else len(batches[rank::world_size])
    was_training = model.training
    model.eval()
    with torch.no_grad(), autocast or contextlib.nullcontext():
        for r in range(rounds):
            j = r * world_size + rank
            idx = batches[j] if j < len(batches) else batches[0]
            rows = [{"input_ids": examples[i]["input_ids"]} for i in idx]
            batch = {k: v.to(device) for k, v in collate_left_padded(rows, pad_id).items()}
            batch_scores = model(**batch).float().to(buffer_device)  # from the head's GPU
            if j < len(batches):
                scores[idx] = batch_scores
    if rt is not None and rt.distributed:
        torch.distributed.all_reduce(scores)
    model.train(was_training)
    return scores.cpu()


def task_metrics(scores: torch.Tensor, targets: list, task: str, label_names: list[str]) -> dict:
    """Accuracy, macro-F1, per-class report and confusion matrix (classification), or MSE, MAE, Pearson and
    Spearman (regression), of the scores against the targets."""
    if task == "regression":
        return regression_metrics(targets, scores[:, 0].tolist())
    return classification_metrics(targets, scores.argmax(-1).tolist(), label_names)


def eval_metrics(scores: torch.Tensor, examples: list[dict], loss: ClsLoss, label_names: list[str],
                 train_targets: list) -> dict:
    """A recipe's eval: eval_loss (the training loss, mean per example), the task's metrics and the baseline that
    ignores the text (the training mean, or the majority class)."""
    targets = [e["label"] for e in examples]
    mean_loss = cls_loss_sum(scores, target_tensor(examples, loss.task), loss).item() / len(targets)
    metrics = {"eval_loss": mean_loss, **task_metrics(scores, targets, loss.task, label_names)}
    if loss.task == "regression":
        metrics["baseline_mean"] = mean_baseline(train_targets, targets)
    else:
        metrics["baseline_majority"] = majority_baseline(train_targets, targets, len(label_names))
    return metrics


def log_eval(log, step: int, total_steps: int, metrics: dict, task: str):
    """The eval's line in the log, and its numbers in metrics.jsonl (eval_loss, eval_accuracy, ...)."""
    keys = EVAL_KEYS[task]
    log.log(step, {"eval_loss": metrics["eval_loss"], **{f"eval_{k}": metrics[k] for k in keys}}, echo=False)
    numbers = " | ".join(f"{k} {metrics[k]:.4f}" for k in keys)
    log.info(f"step {step}/{total_steps} | eval_loss {metrics['eval_loss']:.4f} | {numbers}")


def save_eval_results(log, out: Path, step: int, results: dict, task: str):
    """eval_results.json, and a line comparing the main metric with the baseline's."""
    path = out / "eval_results.json"
    path.write_text(json.dumps({"step": step, **results}, indent=2) + "\n")
    key, baseline = ("mse", "mean") if task == "regression" else ("accuracy", "majority class")
    base = results["baseline_mean" if task == "regression" else "baseline_majority"][key]
    log.info(f"eval     {key} {results[key]:.4f} vs baseline ({baseline}) {base:.4f}; full report in {path}")


def prediction_rows(examples: list[dict], scores: torch.Tensor, task: str, classes: list | None,
                    text_field: str = "text", with_label: bool = False) -> list[dict]:
    """One row per example: its text, its true label (with_label), and the prediction: the number (regression),
    or the class (classes[argmax], as the training data named it) with every class's probability."""
    names = [str(c) for c in classes or []]
    rows = []
    for example, example_scores in zip(examples, scores):
        row = {text_field: example["text"]}
        if with_label:
            row["label"] = example["label"] if task == "regression" else classes[example["label"]]
        if task == "regression":
            row["prediction"] = example_scores[0].item()
        else:
            row["prediction"] = classes[int(example_scores.argmax())]
            row["probabilities"] = dict(zip(names, torch.softmax(example_scores, -1).tolist()))
        rows.append(row)
    return rows


def write_jsonl(path, rows):
    """Rows as JSON lines (predictions.jsonl), the folder made if missing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------------------------------------------
# Pairwise reward models: chosen and rejected scored in one forward.


def score_pairs(reward_model, pairs: list[dict], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards of the chosen and the rejected side of each pair, in one left-padded forward of 2 x len(pairs) rows;
    device: the embedding's (the first GPU of a layer split); the rewards come back on the score head's."""
    rows = [{"input_ids": p["chosen_ids"]} for p in pairs] + [{"input_ids": p["rejected_ids"]} for p in pairs]
    batch = {k: v.to(device) for k, v in collate_left_padded(rows, pad_id).items()}
    rewards = reward_model(**batch).squeeze(-1).float()
    return rewards[: len(pairs)], rewards[len(pairs):]


def evaluate_pairs(reward_model, pairs: list[dict], batch_size: int, pad_id: int, rt, autocast=None) -> dict:
    """Eval loss, pairwise accuracy and mean margin over all pairs (each rank scores its share); the model is in
    eval mode meanwhile, then back in train mode."""
    reward_model.eval()
    chosen, rejected = torch.zeros(len(pairs), device=rt.device), torch.zeros(len(pairs), device=rt.device)
    device = input_device(reward_model)
    batches = plan_batches([len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in pairs], batch_size, 0, 0, True)
    with torch.no_grad(), autocast or contextlib.nullcontext():
        for idx in batches[rt.rank::rt.world_size]:
            scored = score_pairs(reward_model, [pairs[i] for i in idx], pad_id, device)
            chosen[idx], rejected[idx] = (rewards.to(rt.device) for rewards in scored)
    if rt.distributed:  # each pair was scored by exactly one rank; the others hold zeros there
        torch.distributed.all_reduce(chosen)
        torch.distributed.all_reduce(rejected)
    reward_model.train()
    return {"eval_loss": pairwise_loss_sum(chosen, rejected).item() / len(pairs),
            **pairwise_metrics(chosen.tolist(), rejected.tolist())}


def log_pairwise_eval(log, step: int, total_steps: int, metrics: dict):
    """The reward model's eval line in the log, and its numbers in metrics.jsonl."""
    log.log(step, {"eval_loss": metrics["eval_loss"], "eval_pairwise_accuracy": metrics["pairwise_accuracy"],
                   "eval_mean_margin": metrics["mean_margin"]}, echo=False)
    log.info(f"step {step}/{total_steps} | eval_loss {metrics['eval_loss']:.4f} | pairwise accuracy "
             f"{metrics['pairwise_accuracy']:.4f} | mean margin {metrics['mean_margin']:.3f}")


# ---------------------------------------------------------------------------------------------------------------
# What the data looks like: the start-up block and --inspect_data.


def length_summary(lengths: list[int]) -> str:
    """'lengths 5-40 tokens (median 12)'."""
    ordered = sorted(lengths)
    return f"lengths {ordered[0]}-{ordered[-1]} tokens (median {ordered[len(ordered) // 2]})"


def label_summary(examples: list[dict], task: str, classes: list | None) -> str:
    """How many examples each class has, or the targets' range and mean (regression); '' for unlabelled records."""
    targets = [e["label"] for e in examples if "label" in e]
    if not targets:
        return "no labels"
    if task == "regression":
        return f"targets {min(targets):g} to {max(targets):g} (mean {sum(targets) / len(targets):.4g})"
    counts = Counter(targets)
    return "labels " + ", ".join(f"{c} {counts.get(i, 0)}" for i, c in enumerate(classes))


def describe_examples(examples: list[dict], stats, task: str, classes: list | None) -> str:
    """One line on a built cls data file: counts, truncation, lengths and the label distribution."""
    lengths = length_summary([len(e["input_ids"]) for e in examples])
    return f"{stats.summary()} | {lengths} | {label_summary(examples, task, classes)}"


def describe_pairs(pairs: list[dict], stats) -> str:
    """One line on a built preference file: pairs, tokens, truncation and the lengths of each side."""
    chosen = length_summary([len(p["chosen_ids"]) for p in pairs])
    rejected = length_summary([len(p["rejected_ids"]) for p in pairs])
    return f"{stats.summary().replace('examples', 'pairs', 1)} | chosen {chosen} | rejected {rejected}"


def decoded(ids: list[int], tokenizer, max_chars: int) -> str:
    """Token ids as the model sees them (special tokens shown), a long text cut in the middle."""
    pieces = cut_middle([(tokenizer.decode(ids, skip_special_tokens=False), False)], max_chars)
    return repr("".join(text for text, _ in pieces))


def render_cls_example(example: dict, tokenizer, task: str, classes: list | None, max_chars: int = 2000) -> str:
    """A training example as the model reads it, with its label: "'<s> The film was great.</s>' -> 'positive'"."""
    label = example["label"] if task == "regression" else classes[example["label"]]
    return f"{decoded(example['input_ids'], tokenizer, max_chars)} -> {label!r}"


def render_pair(pair: dict, tokenizer, max_chars: int = 2000) -> str:
    """A preference pair as the model reads its two texts (the reward is read at the last token of each)."""
    return (f"chosen {decoded(pair['chosen_ids'], tokenizer, max_chars)}\n"
            f"         rejected {decoded(pair['rejected_ids'], tokenizer, max_chars)}")


def data_report(files: dict, tokenizer, task: str, classes: list | None) -> list[str]:
    """The start-up block's data lines of a cls recipe, also all that --inspect_data prints: per data file
    {name: (path, examples, stats)} its counts, truncation, lengths and labels (task 'pairwise': preference pairs),
    then the first training example as the model reads it, with its label (or chosen and rejected)."""
    lines = []
    for name, (path, examples, stats) in files.items():
        if not examples:
            continue
        if task == "pairwise":
            described = describe_pairs(examples, stats)
        else:
            described = describe_examples(examples, stats, task, classes)
        lead = "data     " if not lines else "         "
        lines.append(f"{lead}{name:<5} {path}: {described}")
    first = files["train"][1][0]
    if task == "pairwise":
        lines.append(f"example  {render_pair(first, tokenizer)}")
    else:
        lines.append(f"example  {render_cls_example(first, tokenizer, task, classes)}")
    return lines
