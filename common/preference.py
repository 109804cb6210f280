"""Preference pairs through a causal LM: the summed log-likelihood of each pair's chosen and rejected answer, one
forward for both sides (left-padded rows, or the answers packed several to a row), and over a whole data set split
across ranks. What DPO, IPO, SimPO and ORPO compare (common.losses.preference_losses); the pairs come from
common.data.build_preference_pairs."""
import math

import torch

from common.data import (
    IGNORE_INDEX,
    collate_left_padded,
    collate_packed,
    pack_examples,
    pack_lengths,
    packed_segment_ids,
    plan_batches,
)
from common.losses import final_hidden_states, loss_window, sequence_logps

SIDES = ("chosen", "rejected")


def pair_sequences(pairs: list[dict], batch: list[int]) -> list[dict]:
    """The 2 x len(batch) answers of a batch as {input_ids, labels}: every chosen one, then every rejected one."""
    return [{"input_ids": pairs[i][f"{side}_ids"], "labels": pairs[i][f"{side}_labels"]} for side in SIDES
            for i in batch]


def tightest_pack_len(lengths: list[int], pack_len: int) -> int:
    """The shortest row length, at most pack_len (or the longest sequence), that packs `lengths` into as few rows
    as pack_len does: the rows come out about equally full, so the batch, as wide as its fullest row, pads little."""
    widest = max(max(lengths), pack_len)
    rows = len(pack_lengths(lengths, widest))
    low, high = max(max(lengths), math.ceil(sum(lengths) / rows)), widest
    while low < high:  # the smallest length that still fits in `rows` rows (a bisection; high always fits)
        middle = (low + high) // 2
        if len(pack_lengths(lengths, middle)) <= rows:
            high = middle
        else:
            low = middle + 1
    return high


def pair_logps(model, head, pairs: list[dict], batch: list[int], pad_id: int, device, pack_len: int = 0,
               attention: str = "sdpa", chunk_tokens: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-likelihood of the chosen and of the rejected answer of each pair in `batch`, in one forward: 2 x
    len(batch) left-padded rows (chosen rows first), or with pack_len > 0 the answers packed into as few rows of at
    most pack_len tokens as they fit in, filled about equally (tightest_pack_len), that keep them apart
    (common.data.collate_packed; `attention` is the model's implementation).
    head: the unwrapped model's LM head, run only where a trained token is predicted (common.losses.sequence_logps,
    chunk_tokens at a time when > 0)."""
    sequences = pair_sequences(pairs, batch)
    if pack_len:
        rows = pack_examples(sequences, tightest_pack_len([len(q["input_ids"]) for q in sequences], pack_len))
        inputs = collate_packed(rows, pad_id, attention)
        segment_id = packed_segment_ids(rows, max(sum(row["segments"]) for row in rows))
        # which answer each position holds: the row's members looked up by segment (-1, padding, picks the -1 added)
        owner = torch.stack([torch.tensor([*row["members"], -1])[segment_id[r]] for r, row in enumerate(rows)])
        owner = owner.reshape(inputs["labels"].shape)  # flash-attention 2 joins the rows into one
    else:
        inputs = collate_left_padded(sequences, pad_id)
        owner = torch.arange(len(sequences))[:, None].expand(inputs["labels"].shape)
    labels = inputs.pop("labels")  # stays on the CPU: the trained tokens are found there, no wait for the GPU
    window = loss_window(labels)
    inputs = {k: v.to(device) for k, v in inputs.items()}
    hidden = final_hidden_states(model, inputs, window)  # no logits inside the model: the head runs in sequence_logps
    logps = sequence_logps(hidden, head, labels, owner, len(sequences), chunk_tokens)
    return logps[: len(batch)], logps[len(batch):]


def answer_tokens(pairs: list[dict]) -> torch.Tensor:
    """[pairs, 2]: the trained tokens of the chosen and the rejected answer (position 0 is never predicted)."""
    counts = [[sum(t != IGNORE_INDEX for t in p[f"{side}_labels"][1:]) for side in SIDES] for p in pairs]
    return torch.tensor(counts, dtype=torch.float64)


def pair_tokens_computed(pairs: list[dict], batch: list[int], pack_len: int = 0) -> int:
    """Tokens (answers and padding) the forward of pair_logps computes for `batch`: 2 x len(batch) rows as wide as
    the longest answer, or with pack_len the packed rows as wide as the fullest one."""
    lengths = [len(pairs[i][f"{side}_ids"]) for side in SIDES for i in batch]
    if not pack_len:
        return len(lengths) * max(lengths)
    rows = pack_lengths(lengths, tightest_pack_len(lengths, pack_len))
    return len(rows) * max(sum(lengths[i] for i in row) for row in rows)


def pair_padding_efficiency(pairs: list[dict], batches: list[list[int]], pack_len: int = 0) -> float:
    """Answer tokens over tokens computed (answers and padding) for a plan of batches, as pair_logps lays them out."""
    real = sum(len(pairs[i][f"{side}_ids"]) for batch in batches for i in batch for side in SIDES)
    return real / max(sum(pair_tokens_computed(pairs, batch, pack_len) for batch in batches), 1)


def all_pair_logps(model, pairs: list[dict], batch_size: int, pad_id: int, rt, autocast, pack_len: int = 0,
                   chunk_tokens: int = 0) -> torch.Tensor:
    """[pairs, 2] float64 log-likelihoods of every pair's chosen and rejected answer (pair_logps, packed with
    pack_len > 0), each rank computing a share; the model in eval mode meanwhile, then back in the mode it was in."""
    was_training = model.training
    model.eval()
    logps = torch.zeros(len(pairs), 2, dtype=torch.float64, device=rt.device)
    device = model.get_input_embeddings().weight.device
    head = model.get_output_embeddings()
    attention = model.config._attn_implementation
    lengths = [len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in pairs]
    with torch.no_grad(), autocast:
        for batch in plan_batches(lengths, batch_size, 0, 0, True)[rt.rank::rt.world_size]:
            chosen, rejected = pair_logps(model, head, pairs, batch, pad_id, device, pack_len, attention,
                                          chunk_tokens)
            logps[batch] = torch.stack([chosen, rejected], -1).double().to(rt.device)
    if rt.distributed:  # each pair was done by one rank; the others hold zeros there
        torch.distributed.all_reduce(logps)
    model.train(was_training)
    return logps.cpu()
