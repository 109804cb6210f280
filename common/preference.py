"""Preference pairs through a causal LM: the summed log-likelihood of each pair's chosen and rejected answer, one
left-padded forward for both sides, and over a whole data set split across ranks. What DPO, IPO, SimPO and ORPO
compare (common.losses.preference_losses); the pairs come from common.data.build_preference_pairs."""
import torch

from common.data import IGNORE_INDEX, collate_left_padded, plan_batches
from common.losses import loss_window, token_logprobs


def pair_logps(model, pairs: list[dict], batch: list[int], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-likelihood of the chosen and of the rejected answer of each pair in `batch`, in one left-padded
    forward of 2 x len(batch) rows (chosen rows first); logits only over the answer columns."""
    rows = [{"input_ids": pairs[i][f"{side}_ids"], "labels": pairs[i][f"{side}_labels"]}
            for side in ("chosen", "rejected") for i in batch]
    inputs = collate_left_padded(rows, pad_id)
    window = loss_window(inputs["labels"])  # from the CPU labels: no wait for the GPU
    inputs = {k: v.to(device) for k, v in inputs.items()}
    labels = inputs.pop("labels")
    logits = model(**inputs, use_cache=False, logits_to_keep=window).logits
    logps = token_logprobs(logits, labels.to(logits.device))[0].sum(-1)
    return logps[: len(batch)], logps[len(batch):]


def answer_tokens(pairs: list[dict]) -> torch.Tensor:
    """[pairs, 2]: the trained tokens of the chosen and the rejected answer (position 0 is never predicted)."""
    sides = ("chosen", "rejected")
    counts = [[sum(t != IGNORE_INDEX for t in p[f"{side}_labels"][1:]) for side in sides] for p in pairs]
    return torch.tensor(counts, dtype=torch.float64)


def all_pair_logps(model, pairs: list[dict], batch_size: int, pad_id: int, rt, autocast) -> torch.Tensor:
    """[pairs, 2] float64 log-likelihoods of every pair's chosen and rejected answer, each rank computing a share;
    the model in eval mode meanwhile, then back in the mode it was in."""
    was_training = model.training
    model.eval()
    logps = torch.zeros(len(pairs), 2, dtype=torch.float64, device=rt.device)
    device = model.get_input_embeddings().weight.device
    lengths = [len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in pairs]
    with torch.no_grad(), autocast:
        for batch in plan_batches(lengths, batch_size, 0, 0, True)[rt.rank::rt.world_size]:
            chosen, rejected = pair_logps(model, pairs, batch, pad_id, device)
            logps[batch] = torch.stack([chosen, rejected], -1).double().to(rt.device)
    if rt.distributed:  # each pair was done by one rank; the others hold zeros there
        torch.distributed.all_reduce(logps)
    model.train(was_training)
    return logps.cpu()
