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


# Fields that do not make a run different: where it writes, how it reports, whether it resumes
NOT_THE_RUN = {"output_dir", "resume", "overwrite", "report_to", "log_every", "eval_every", "save_every", "keep_last",
               "max_steps", "epochs"}  # a resumed run may be made longer


def prepare_output_dir(cfg, output_dir, is_main: bool = True) -> Path:
    """Make output_dir ready for this run and write its config.json; never silently mix two runs in one folder.

    A folder holding an earlier run (its config.json) is refused, with what differs, unless this run resumes it
    (--resume, same settings), starts it over (--overwrite: its metrics, checkpoints and logs are removed), or is the
    same command again with no checkpoints to lose (its metrics are started afresh)."""
    import json

    from common.config import UserError, config_to_dict, save_config

    out = Path(output_dir)
    if not is_main:
        return out
    previous_file = out / "config.json"
    # an earlier attempt that stopped before training (a bad option, a missing file) left only its config.json
    metrics = out / "metrics.jsonl"
    started = (metrics.is_file() and metrics.stat().st_size > 0) or (out / "final").is_dir() or bool(list_checkpoints(out))
    if previous_file.is_file() and started:
        try:
            previous = json.loads(previous_file.read_text())
        except json.JSONDecodeError:
            previous = {}
        current = json.loads(json.dumps(config_to_dict(cfg), default=str))
        changed = sorted(k for k in set(previous) | set(current)
                         if k not in NOT_THE_RUN and previous.get(k) != current.get(k))
        has_checkpoints = bool(list_checkpoints(out))
        if not getattr(cfg, "overwrite", False):
            what = ", ".join(f"--{k} {previous.get(k)!r} -> {current.get(k)!r}" for k in changed[:4])
            if changed:
                raise UserError(f"--output_dir={out} holds a different run ({what}{', ...' if len(changed) > 4 else ''}); "
                                "use another --output_dir, --overwrite to replace it, or its own settings with --resume")
            if has_checkpoints and not getattr(cfg, "resume", False):
                raise UserError(f"--output_dir={out} holds checkpoints of this run (latest "
                                f"{latest_checkpoint(out).name}); add --resume to continue it or --overwrite to start over")
        if getattr(cfg, "overwrite", False):
            for name in ("checkpoints", "tensorboard"):
                shutil.rmtree(out / name, ignore_errors=True)
        if getattr(cfg, "overwrite", False) or not getattr(cfg, "resume", False):
            (out / "metrics.jsonl").unlink(missing_ok=True)  # a new run's history starts empty
    save_config(cfg, out)
    return out
