"""Losses, written as sums so a step's loss can be normalised by the trained tokens of the whole step
(all micro-batches, all ranks): the mean over tokens, however the batch was split."""
import torch
import torch.nn.functional as F

from common.data import IGNORE_INDEX


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over positions whose label is not -100 (logits[t] predicts labels[t+1]).

    The labels are shifted rather than the logits: slicing logits would copy the largest tensor of the step."""
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


def count_trained_tokens(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != IGNORE_INDEX).sum())
