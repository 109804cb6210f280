"""Checkpoints that are never half-written: each is built in a temporary folder and renamed into place.

Layout: output_dir/checkpoints/step_00000040/ with the model or adapter files (save_pretrained) and
trainer_state.pt (optimizer, scheduler, every rank's RNG states, step; tensors and plain values only, read with
weights_only=True). `latest_checkpoint` only ever sees complete folders.
"""
import os
import pickle
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

STATE_FILE = "trainer_state.pt"


def atomic_write_text(target: Path, text: str) -> Path:
    """Write text (UTF-8) to a temporary file beside `target`, then rename it into place: a reader sees the old
    file or the whole new one, never half of it; the folder is made if missing."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, target)
    return target


def atomic_write_dir(target: Path, write) -> Path:
    """Call write(tmp_dir), then move tmp_dir to `target` in one rename (replacing an older `target`). When write
    raises, the temporary folder is removed and `target` stays as it was."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return move_dir_into_place(tmp, target)


def move_dir_into_place(tmp: Path, target: Path) -> Path:
    """Rename the finished folder tmp to target (on the same file system): an older target is renamed aside first
    and removed after, so target is at every moment the old folder or the whole new one, never a mix."""
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    if target.exists():  # a rerun into the same output_dir
        os.rename(target, old)
    os.rename(tmp, target)
    shutil.rmtree(old, ignore_errors=True)
    return target


def rng_state() -> dict:
    """This process's RNG states, in the types torch.load(weights_only=True) reads back: numpy's key as a tensor, and
    only this rank's own GPU (each rank draws from its own device's generator)."""
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached_gaussian)]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state(torch.cuda.current_device())
    return state


def set_rng_state(state: dict):
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"], torch.cuda.current_device())


def every_rank_rng_state() -> list[dict]:
    """rng_state() of every rank, in rank order (one process: a list of one); every rank must call it."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [rng_state()]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, rng_state())
    return states


def restore_rank_rng_state(state: dict):
    """This rank's RNG streams from trainer_state.pt; saved by another number of processes, they restart from the
    seed instead, and rank 0 says so."""
    import torch.distributed as dist

    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if state["world_size"] == world_size:
        set_rng_state(state["rng"][rank])
    elif rank == 0:
        print(f"resume: the checkpoint was taken with {state['world_size']} process(es), this run has {world_size}: "
              "RNG streams (dropout, shuffling) restart from the seed on each rank", flush=True)


def load_state_file(folder: Path) -> dict:
    """trainer_state.pt, read with weights_only=True: tensors and plain values only, so a checkpoint folder from
    someone else cannot run code when it is resumed."""
    from common.config import UserError

    path = Path(folder) / STATE_FILE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = next((line.split("WeightsUnpickler error: ", 1)[1] for line in str(e).splitlines()
                       if "WeightsUnpickler error: " in line), "not tensors and plain values")
        reason = reason.split(" was not an allowed global")[0]
        raise UserError(f"--resume: {path}: refused, it is not a trainer state these recipes write and loading it "
                        f"could run code ({reason})") from None


def cast_floating(state_dict: dict, dtype: torch.dtype) -> dict:
    """A final/ model's weights in the dtype it trained in (bf16 on GPUs), not FSDP's fp32 master copies: half the
    size, and what from_pretrained then loads. Cast in place, one tensor at a time, so fp32 and bf16 copies of the
    whole model never sit side by side in host RAM; integer tensors stay as they are."""
    for name, tensor in state_dict.items():
        if tensor.is_floating_point():
            state_dict[name] = tensor.to(dtype)
    return state_dict


def save_checkpoint(output_dir, step: int, save_model, optimizer, scheduler, keep_last: int, scaler=None) -> Path:
    """Write checkpoints/step_N atomically: save_model(folder) writes the weights; keep the newest keep_last. An
    enabled torch.amp.GradScaler (fp16) saves its loss scale too: resumed without it, the scale would start again at
    2^16 and the first steps after the resume would overflow and be skipped.

    For replicated training (one process, DDP): every rank calls it, rank 0 writes (with every rank's RNG state), the
    others wait for it with the long save timeout (common/runtime.py:wait_for_all)."""
    import torch.distributed as dist

    from common.runtime import save_timeout, wait_for_all

    rngs = every_rank_rng_state()
    path = Path(output_dir) / "checkpoints" / f"step_{step:08d}"
    if not dist.is_initialized() or dist.get_rank() == 0:
        def write(folder: Path):
            save_model(folder)
            state = {"step": step, "world_size": len(rngs), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "rng": rngs}
            if scaler is not None and scaler.is_enabled():
                state["grad_scaler"] = scaler.state_dict()
            torch.save(state, folder / STATE_FILE)

        atomic_write_dir(path, write)
        for old in list_checkpoints(output_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    optimizer_bytes = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                          if torch.is_tensor(t))
    wait_for_all(save_timeout(optimizer_bytes))
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


def resume_checkpoint(output_dir) -> Path | None:
    """The checkpoint --resume continues from, the same on every rank: rank 0's latest, broadcast to the others (each
    rank looking on its own disk could pick different steps). Only rank 0 writes checkpoints, so a rank that cannot
    read the chosen one stops every rank with one line. Every rank must call it."""
    import socket

    import torch.distributed as dist

    from common.config import UserError

    latest = latest_checkpoint(output_dir)
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return latest
    chosen = [latest.name if latest else ""]
    dist.broadcast_object_list(chosen, src=0)
    folder = Path(output_dir) / "checkpoints" / chosen[0] if chosen[0] else None
    readable = folder is None or (folder / STATE_FILE).is_file()
    unreadable = [None] * dist.get_world_size()
    dist.all_gather_object(unreadable, "" if readable else f"{dist.get_rank()} ({socket.gethostname()})")
    missing_on = ", ".join(r for r in unreadable if r)
    if missing_on:
        raise UserError(f"--resume: {folder} is missing on rank {missing_on}; only rank 0 writes checkpoints, so "
                        "--output_dir must be on a file system all nodes share")
    return folder


def load_trainer_state(folder: Path, optimizer, scheduler, scaler=None) -> int:
    """Restore optimizer, scheduler, this rank's RNG and an enabled GradScaler's loss scale (when the checkpoint
    has one: one taken in bf16 or fp32 has none) from a checkpoint; returns the step it was taken at."""
    state = load_state_file(folder)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and scaler.is_enabled() and "grad_scaler" in state:
        scaler.load_state_dict(state["grad_scaler"])
    restore_rank_rng_state(state)
    return state["step"]


def resume_adapter_training(model, optimizer, scheduler, output_dir, device: torch.device, log, scaler=None) -> int:
    """--resume for the LoRA recipes: the adapter (with a score head where there is one), optimizer, schedule, RNG
    and loss scale of rank 0's latest checkpoint, on every rank; returns its step (0, said in the log, when there is
    none)."""
    folder = resume_checkpoint(output_dir)
    if folder is None:
        log.info(f"--resume: no checkpoint in {Path(output_dir) / 'checkpoints'}, starting from step 0")
        return 0
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(folder / "adapter_model.safetensors", device=str(device)))
    start_step = load_trainer_state(folder, optimizer, scheduler, scaler)
    log.info(f"resumed from {folder} at step {start_step}")
    return start_step


def save_sharded_checkpoint(output_dir, step: int, keep_last: int, write_shards, extra: dict | None = None) -> Path:
    """A checkpoint that every rank writes a part of (DeepSpeed ZeRO, FSDP), made atomic: all ranks write into
    checkpoints/.step_N.tmp (write_shards(tmp)), then rank 0 adds trainer_state.pt (step, every rank's RNG state,
    `extra`) and renames the folder into place, so a crash mid-save leaves the previous checkpoints as they were.
    The folder must be on a file system all ranks share. Every rank must call it; returns the folder."""
    import torch.distributed as dist

    from common.runtime import save_timeout, wait_for_all

    root = Path(output_dir) / "checkpoints"
    target, tmp = root / f"step_{step:08d}", root / f".step_{step:08d}.tmp"
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run that died while saving
        tmp.mkdir(parents=True)
    dist.barrier()
    write_shards(tmp)
    rngs = every_rank_rng_state()
    if rank == 0:
        torch.save({"step": step, "world_size": len(rngs), "rng": rngs, **(extra or {})}, tmp / STATE_FILE)
        move_dir_into_place(tmp, target)  # the one moment the checkpoint appears, complete
        for stale in list_checkpoints(output_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(stale, ignore_errors=True)
    wait_for_all(save_timeout(0))  # rank 0 renames and removes old checkpoints (slow on a network file system)
    return target


def save_dcp_checkpoint(output_dir, step: int, keep_last: int, model, optimizer, scheduler) -> Path:
    """A sharded checkpoint of FSDP2 (or pipeline-stage) modules: every rank writes its own shards of the weights and
    optimizer state with torch.distributed.checkpoint, under their module names (pipeline stages name their layers
    by global index, so the stages' names never clash); rank 0 adds the schedule and the step. Every rank calls it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    # the optimizer's groups flattened under parameter names too: saved as "param_groups.0.lr", two stages' group 0
    # would overwrite each other
    options = StateDictOptions(flatten_optimizer_state_dict=True)
    model_state, optim_state = get_state_dict(model, optimizer, options=options)

    def write_shards(tmp: Path):
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(tmp))

    extra = {"scheduler": scheduler.state_dict()}
    return save_sharded_checkpoint(output_dir, step, keep_last, write_shards, extra=extra)


def load_dcp_checkpoint(folder: Path, model, optimizer, scheduler) -> int:
    """save_dcp_checkpoint's folder read back: each rank its own shards of the weights and optimizer state, the
    schedule, this rank's RNG state. Returns the step."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    options = StateDictOptions(flatten_optimizer_state_dict=True)
    model_state, optim_state = get_state_dict(model, optimizer, options=options)
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=options)
    trainer_state = load_sharded_trainer_state(folder)  # step, RNG
    scheduler.load_state_dict(trainer_state["scheduler"])
    return trainer_state["step"]


def load_sharded_trainer_state(folder: Path) -> dict:
    """trainer_state.pt of a sharded checkpoint, with this rank's RNG state restored (when the world size matches)."""
    state = load_state_file(folder)
    restore_rank_rng_state(state)
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
    has_metrics = metrics.is_file() and metrics.stat().st_size > 0
    started = has_metrics or (out / "final").is_dir() or bool(list_checkpoints(out))
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
            more = ", ..." if len(changed) > 4 else ""
            if changed:
                raise UserError(f"--output_dir={out} holds a different run ({what}{more}); use another --output_dir, "
                                "--overwrite to replace it, or its own settings with --resume")
            if has_checkpoints and not getattr(cfg, "resume", False):
                raise UserError(f"--output_dir={out} holds checkpoints of this run (latest "
                                f"{latest_checkpoint(out).name}); add --resume to continue it or --overwrite to "
                                "start over")
        if getattr(cfg, "overwrite", False):
            for name in ("checkpoints", "tensorboard"):
                shutil.rmtree(out / name, ignore_errors=True)
        if getattr(cfg, "overwrite", False) or not getattr(cfg, "resume", False):
            (out / "metrics.jsonl").unlink(missing_ok=True)  # a new run's history starts empty
    save_config(cfg, out)
    return out
