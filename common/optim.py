"""Optimizer and learning-rate schedule."""
import math
from dataclasses import dataclass

import torch

OPTIMIZERS = ("adamw", "paged_adamw_8bit", "adamw_8bit")


@dataclass(frozen=True)
class LearningRate:
    value: float
    description: str  # for the start-up log: the rate and where it came from


def resolve_lr(lr: float | None, model_path: str, real_base_lr: float, tiny_lr: float) -> LearningRate:
    """The peak learning rate of a run: --lr when given; else real_base_lr, the rate for a real pretrained base, or
    tiny_lr with --model_path=tiny (the random-init test Llama needs a higher rate to show learning in a minute)."""
    if lr is not None:
        if not lr > 0:
            from common.config import UserError

            raise UserError(f"--lr={lr}: expected a positive learning rate")
        return LearningRate(lr, f"{lr:.1e} (--lr)")
    if model_path == "tiny":
        return LearningRate(tiny_lr, f"{tiny_lr:.1e} (tiny model; a real base gets {real_base_lr:.1e})")
    return LearningRate(real_base_lr, f"{real_base_lr:.1e} (default for a real base)")


def make_optimizer(model, name: str, lr: float, weight_decay: float, device: torch.device):
    """AdamW over the trainable parameters; no weight decay on biases and norms.

    name "paged_adamw_8bit" (the QLoRA choice: 8-bit states paged to host memory under pressure) and "adamw_8bit"
    need bitsandbytes on a GPU; on CPU they fall back to torch AdamW.
    """
    if name not in OPTIMIZERS:
        from common.config import UserError

        raise UserError(f"--optim={name}: expected one of {', '.join(OPTIMIZERS)}")
    groups = weight_decay_groups(model, weight_decay)
    if name != "adamw" and device.type == "cuda":
        import bitsandbytes as bnb

        cls = bnb.optim.PagedAdamW8bit if name == "paged_adamw_8bit" else bnb.optim.AdamW8bit
        return cls(groups, lr=lr, betas=(0.9, 0.999))
    # fused: one kernel over all the parameters, on a GPU and on CPU alike (on CPU 3-4x faster than the per-parameter
    # loop over a LoRA model's ~400 small tensors, ~50 ms of a 1.5 s step on a 135M model; bench/peers.py)
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), fused=device.type in ("cuda", "cpu"))


def warmup_cosine(total_steps: int, warmup_steps: int, min_ratio: float = 0.1):
    """LambdaLR factor: linear warmup to 1, then cosine decay to min_ratio at total_steps."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def weight_decay_groups(model, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: decay on matrices, none on norms and biases.

    Under DeepSpeed ZeRO-3 a parameter's own shape is empty (its data is a partition); `ds_shape` is the real one, so
    use it, or every weight would look like a vector and escape decay. FSDP2's DTensors report their full shape.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            ndim = len(getattr(p, "ds_shape", p.shape))
            (no_decay if ndim < 2 or "norm" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
