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
