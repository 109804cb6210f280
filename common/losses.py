"""Losses, written as sums so a step's loss can be normalised by the trained tokens of the whole step
(all micro-batches, all ranks): the mean over tokens, however the batch was split."""
import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from common.config import UserError
from common.data import IGNORE_INDEX


def next_token_targets(labels: torch.Tensor, columns: int) -> torch.Tensor:
    """The token each of the last `columns` positions predicts (labels shifted left by one, -100 past the end): the
    targets of logits (or hidden states) that cover only the last columns of the rows."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)[:, labels.shape[1] - columns:]


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over positions whose label is not -100 (logits[t] predicts labels[t+1]).

    The labels are shifted rather than the logits: slicing logits would copy the largest tensor of the step.
    logits may cover only the last positions of the rows (the model run with logits_to_keep=loss_window(labels))."""
    targets = next_token_targets(labels, logits.shape[1])
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


def trained_token_loss_sum(hidden: torch.Tensor, head, labels: torch.Tensor, chunk_tokens: int = 0) -> torch.Tensor:
    """token_loss_sum(head(hidden), labels), with the LM head run only where a trained token is predicted: the
    trained positions are gathered into one [tokens, hidden] matrix (a plain matmul for the head; on the sliced 3-D
    window HF passes it, the head ran as a batched matmul), so prompts and pads get no logits at all. labels may stay
    on the CPU: the trained positions are found there, so a GPU run does not wait on them. chunk_tokens > 0: the
    head and the fp32 cross-entropy run on that many tokens at a time and each chunk is recomputed in the backward
    pass instead of kept (activation checkpointing), so at most one chunk of vocabulary-sized logits exists; it costs
    one more head matmul per chunk. With a 128k vocabulary a 2,048-token row's logits are 1 GB in fp32. hidden: the
    final hidden states (after the last norm) of the last hidden.shape[1] positions, lined up with labels as in
    token_loss_sum."""
    return -trained_token_logps(hidden, head, labels, chunk_tokens)[0].sum()


def trained_token_logps(hidden: torch.Tensor, head, labels: torch.Tensor,
                        chunk_tokens: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The log-probability of each trained token ([tokens], fp32) and where it is among the flattened last
    hidden.shape[1] positions (found on labels' device), the head run as trained_token_loss_sum says: only on the
    positions that predict a trained token, chunk_tokens at a time with recomputation when > 0."""
    if chunk_tokens < 0:
        raise ValueError(f"chunk_tokens must be 0 (one piece) or more, got {chunk_tokens}")
    targets = next_token_targets(labels, hidden.shape[1]).flatten()
    trained = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    states = hidden.flatten(0, 1)[trained.to(hidden.device)]
    targets = targets[trained].to(hidden.device)
    if not chunk_tokens:
        return head_logps(head, states, targets), trained
    pieces = [states[:0].sum(-1).float()]  # empty, joined to the graph: backward works when no token is trained
    for start in range(0, len(targets), chunk_tokens):
        end = start + chunk_tokens
        pieces.append(checkpoint(head_logps, head, states[start:end], targets[start:end], use_reentrant=False))
    return torch.cat(pieces), trained


def head_logps(head, states: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Log-probability of each target under head(states), without a second [tokens, vocabulary] copy."""
    return -F.cross_entropy(head(states).float(), targets, reduction="none")


def sequence_logps(hidden: torch.Tensor, head, labels: torch.Tensor, owner: torch.Tensor, n_sequences: int,
                   chunk_tokens: int = 0) -> torch.Tensor:
    """[n_sequences] fp32: the summed log-likelihood of each sequence's trained tokens (what DPO, IPO, SimPO and ORPO
    compare), through trained_token_logps. owner, shaped like labels: the sequence (0 .. n_sequences - 1) each token
    belongs to; a left-padded batch holds one sequence per row, packed rows several, so a row's sum is not enough."""
    logps, trained = trained_token_logps(hidden, head, labels, chunk_tokens)
    owners = next_token_targets(owner, hidden.shape[1]).flatten()[trained]  # the sequence of each predicted token
    sums = torch.zeros(n_sequences, dtype=logps.dtype, device=logps.device)
    return sums.index_add(0, owners.to(logps.device), logps)


def causal_lm_loss_sum(model, head, batch: dict, labels: torch.Tensor, window: int, chunk_tokens: int = 0):
    """The summed next-token loss of model(**batch) over labels' trained tokens, the recipes' training loss: the
    model computes the final hidden states and no logits (logits_to_keep is an empty list of positions), then
    trained_token_loss_sum runs `head` (the unwrapped model's get_output_embeddings(): the model may be wrapped by
    DDP) on the last `window` positions' trained tokens, all at once or chunk_tokens at a time."""
    return trained_token_loss_sum(final_hidden_states(model, batch, window), head, labels, chunk_tokens)


def final_hidden_states(model, batch: dict, window: int) -> torch.Tensor:
    """model(**batch)'s final hidden states (after the last norm, as the LM head sees them) at the last `window`
    positions, with no logits computed inside the model: logits_to_keep is an empty list of positions (=1 would
    still run the head on one position per row)."""
    no_positions = torch.zeros(0, dtype=torch.long)
    outputs = model(**batch, use_cache=False, logits_to_keep=no_positions, output_hidden_states=True)
    return outputs.hidden_states[-1][:, -window:]


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each trained token under the model and where the trained tokens are: (logps, mask), both
    [rows, logits columns], logps 0 where mask is False. Positions line up as in token_loss_sum (logits[t] predicts
    labels[t+1]; logits may cover only the last columns). Summed over a row: the log-likelihood of its answer, the
    quantity preference losses (DPO, SimPO, ORPO) and the policy gradient (GRPO) work with."""
    targets = next_token_targets(labels, logits.shape[1])
    mask = targets != IGNORE_INDEX
    picked = -F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                              reduction="none")  # log_softmax gathered at the target, without a second [N, V] copy
    return picked.view(targets.shape) * mask, mask


def loss_window(labels: torch.Tensor) -> int:
    """How many final positions of the rows predict a trained token: the LM head and the loss are needed only
    there (pass it as the model's logits_to_keep). With left padding and the answer last, that is the longest
    answer, not the whole row: prompt positions cost no vocabulary-sized logits (for a 128k vocabulary, gigabytes)."""
    columns = (labels[:, 1:] != IGNORE_INDEX).any(0).nonzero()
    return labels.shape[1] - int(columns[0]) if len(columns) else 1


def count_trained_tokens(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def classification_loss_sum(logits, labels, loss="ce", label_smoothing=0.0, class_weights=None, focal_gamma=2.0):
    """Summed per-example loss over the batch: cross-entropy (optionally label-smoothed and class-weighted) or focal
    loss, -w_y (1 - p_y)^gamma log p_y, which down-weights examples the model already gets right."""
    logits = logits.float()
    if loss == "ce":
        per_example = F.cross_entropy(logits, labels, reduction="none", label_smoothing=label_smoothing)
    elif loss == "focal":
        log_p = F.log_softmax(logits, -1).gather(1, labels[:, None]).squeeze(1)
        per_example = -((1 - log_p.exp()) ** focal_gamma) * log_p
    else:
        raise ValueError(f"classification loss must be 'ce' or 'focal', got {loss!r}")
    if class_weights is not None:
        per_example = per_example * class_weights.to(per_example.device)[labels]
    return per_example.sum()


def regression_loss_sum(predictions, targets, loss="mse", huber_delta=1.0):
    """Summed squared error (mse) or Huber loss of one predicted number per example."""
    predictions, targets = predictions.float().view(-1), targets.float().view(-1)
    if loss == "mse":
        return F.mse_loss(predictions, targets, reduction="sum")
    if loss == "huber":
        return F.huber_loss(predictions, targets, reduction="sum", delta=huber_delta)
    raise ValueError(f"regression loss must be 'mse' or 'huber', got {loss!r}")


def pairwise_loss_sum(chosen_rewards, rejected_rewards):
    """Bradley-Terry: -log sigmoid(r_chosen - r_rejected), summed over pairs."""
    return -F.logsigmoid(chosen_rewards.float() - rejected_rewards.float()).sum()


PREFERENCE_LOSSES = ("dpo", "ipo", "simpo", "orpo")
DEFAULT_BETA = {"dpo": 0.1, "ipo": 0.1, "simpo": 2.0, "orpo": 0.1}  # each paper's (or its common) setting


def preference_losses(loss: str, beta: float, chosen_logps, rejected_logps, chosen_tokens, rejected_tokens,
                      reference_chosen=None, reference_rejected=None, simpo_gamma: float = 0.5):
    """Per-pair losses and implicit rewards (chosen, rejected) of one batch of preference pairs, from the summed
    log-likelihood of each answer under the policy (and the reference model) and its token count:
      dpo    -log sigmoid(beta * ((pc - rc) - (pr - rr)))                     (Rafailov et al. 2023)
      ipo    ((pc - rc)/nc - (pr - rr)/nr - 1 / (2 beta))^2, per-token averages (Azar et al. 2023)
      simpo  -log sigmoid(beta * (pc/nc - pr/nr) - gamma), reference-free     (Meng et al. 2024)
      orpo   -pc/nc - beta * log sigmoid(log odds(chosen) - log odds(rejected)), odds(y) = p/(1 - p) with
             p = exp(mean token log-prob); the SFT term and the odds ratio in one, reference-free (Hong et al. 2024)
    The rewards are beta times the log-ratio (or the average log-prob) each loss compares."""
    if loss not in PREFERENCE_LOSSES:
        raise ValueError(f"preference loss must be one of {PREFERENCE_LOSSES}, got {loss!r}")
    pc, pr = chosen_logps.double(), rejected_logps.double()
    nc, nr = chosen_tokens.double().clamp(min=1), rejected_tokens.double().clamp(min=1)
    if loss == "dpo":
        chosen_rewards, rejected_rewards = beta * (pc - reference_chosen), beta * (pr - reference_rejected)
        losses = -F.logsigmoid(chosen_rewards - rejected_rewards)
    elif loss == "ipo":
        chosen_ratio, rejected_ratio = (pc - reference_chosen) / nc, (pr - reference_rejected) / nr
        losses = (chosen_ratio - rejected_ratio - 1 / (2 * beta)) ** 2
        chosen_rewards, rejected_rewards = beta * chosen_ratio, beta * rejected_ratio
    elif loss == "simpo":
        chosen_rewards, rejected_rewards = beta * pc / nc, beta * pr / nr
        losses = -F.logsigmoid(chosen_rewards - rejected_rewards - simpo_gamma)
    else:
        chosen_mean, rejected_mean = (pc / nc).clamp(max=-1e-6), (pr / nr).clamp(max=-1e-6)  # p < 1: finite odds
        log_odds = (chosen_mean - torch.log1p(-chosen_mean.exp())) - (rejected_mean - torch.log1p(-rejected_mean.exp()))
        losses = -chosen_mean - beta * F.logsigmoid(log_odds)
        chosen_rewards, rejected_rewards = beta * chosen_mean, beta * rejected_mean
    return losses, chosen_rewards, rejected_rewards


def reward_accuracy(chosen_rewards, rejected_rewards) -> torch.Tensor:
    """Per pair: 1 where the chosen answer has the higher implicit reward, 0.5 on a tie (before any update the policy
    is the reference and every DPO pair ties: a coin flip, not a failure), else 0."""
    return (chosen_rewards > rejected_rewards).double() + 0.5 * (chosen_rewards == rejected_rewards).double()


class NonFiniteLoss(UserError):
    """A step's loss or gradient norm is nan or inf (reported as one line: it names the step and what to do)."""


def is_finite(loss: float, grad_norm, loss_scaled: bool = False) -> bool:
    """Whether a step may update the weights: its loss and gradient norm are finite numbers.

    loss_scaled: an enabled torch.amp.GradScaler (fp16) steps the optimizer. Its inf gradients with a finite loss are
    an fp16 overflow of the scaled loss, which scaler.step skips and scaler.update answers by halving the scale: a
    normal event in fp16 training, not a reason to stop. Only the loss counts then."""
    norm = float(grad_norm) if grad_norm is not None else 0.0
    if loss_scaled:
        return math.isfinite(loss)
    return math.isfinite(loss) and math.isfinite(norm)


def non_finite_error(step: int, loss: float, grad_norm, output_dir) -> NonFiniteLoss:
    """The one-line error a recipe raises on a non-finite step with --on_nan=stop, before any update, so the weights
    and the last checkpoint stay as they were: it names the step, the values, the last checkpoint and what to do."""
    from common.checkpoint import latest_checkpoint

    norm = "not computed" if grad_norm is None else float(grad_norm)  # a check before backward has no norm yet
    last = latest_checkpoint(output_dir)
    return NonFiniteLoss(f"step {step}: loss {loss}, gradient norm {norm}; stopped before updating the weights "
                         f"(last checkpoint: {last or 'none'}); lower --lr or check the data, resume with --resume, "
                         "or skip such steps with --on_nan=skip")
