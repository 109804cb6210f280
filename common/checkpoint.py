"""Checkpoints that are never half-written: each is built in a temporary folder and renamed into place.

Layout: output_dir/checkpoints/step_00000040/ with the model or adapter files (save_pretrained) and
trainer_state.pt (optimizer, scheduler, RNG states, step). `latest_checkpoint` only ever sees complete folders.
"""
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

STATE_FILE = "trainer_state.pt"


def atomic_write_dir(target: Path, write) -> Path:
    """Call write(tmp_dir), then move tmp_dir to `target` in one rename (replacing an older `target`)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write(tmp)
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    if target.exists():
        os.rename(target, old)
    os.rename(tmp, target)
    shutil.rmtree(old, ignore_errors=True)
    return target


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(output_dir, step: int, save_model, optimizer, scheduler, keep_last: int) -> Path:
    """Write checkpoints/step_N atomically: save_model(folder) writes the weights; keep the newest keep_last."""
    def write(folder: Path):
        save_model(folder)
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "rng": rng_state()}, folder / STATE_FILE)

    path = atomic_write_dir(Path(output_dir) / "checkpoints" / f"step_{step:08d}", write)
    for old in list_checkpoints(output_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return path


def list_checkpoints(output_dir) -> list[Path]:
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if re.fullmatch(r"step_\d{8}", p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(output_dir) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def load_trainer_state(folder: Path, optimizer, scheduler) -> int:
    """Restore optimizer, scheduler and RNG from a checkpoint; returns the step it was taken at."""
    state = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=False)  # our own file
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return state["step"]


def save_sharded_checkpoint(output_dir, step: int, keep_last: int, write_shards, extra: dict | None = None) -> Path:
    """A checkpoint that every rank writes a part of (DeepSpeed ZeRO, FSDP), made atomic: all ranks write into
    checkpoints/.step_N.tmp (write_shards(tmp)), then rank 0 adds trainer_state.pt (step, every rank's RNG state,
    `extra`) and renames the folder into place, so a crash mid-save leaves the previous checkpoints as they were.
    The folder must be on a file system all ranks share. Every rank must call it; returns the folder."""
    import torch.distributed as dist

    root = Path(output_dir) / "checkpoints"
    target, tmp = root / f"step_{step:08d}", root / f".step_{step:08d}.tmp"
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run that died while saving
        tmp.mkdir(parents=True)
    dist.barrier()
    write_shards(tmp)
    rngs = [None] * dist.get_world_size()
    dist.all_gather_object(rngs, rng_state())
    if rank == 0:
        torch.save({"step": step, "world_size": len(rngs), "rng": rngs, **(extra or {})}, tmp / STATE_FILE)
        old = root / f".step_{step:08d}.old"
        if target.exists():  # a rerun into the same output_dir
            os.rename(target, old)
        os.rename(tmp, target)  # the one moment the checkpoint appears, complete
        shutil.rmtree(old, ignore_errors=True)
        for stale in list_checkpoints(output_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(stale, ignore_errors=True)
    dist.barrier()
    return target


def load_sharded_trainer_state(folder: Path) -> dict:
    """trainer_state.pt of a sharded checkpoint, with this rank's RNG state restored (when the world size matches)."""
    import torch.distributed as dist

    state = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=False)  # our own file
    if state["world_size"] == dist.get_world_size():
        set_rng_state(state["rng"][dist.get_rank()])
    return state
