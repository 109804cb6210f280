"""What every DeepSpeed recipe needs around its engine: a process group for a lone `python train.py`, the
DeepSpeed config with the values the recipe's Config owns written in, weight-decay groups that survive ZeRO-3,
checkpoints that are never half-written, and the whole model gathered for a Hugging Face save.

Checkpoint layout (the same names as common/checkpoint.py, so `latest_checkpoint` finds them):
    output_dir/checkpoints/step_00000040/
        latest, global_step40/...    DeepSpeed's own files: every rank's optimizer partition, the module, scheduler
        zero_to_fp32.py              DeepSpeed's script that merges the partitions into one fp32 state dict
        trainer_state.pt             step and every rank's RNG state; written last, by rank 0
Every rank writes into checkpoints/.step_00000040.tmp; rank 0 renames it into place once all ranks are done. The
folder must therefore be on a file system all ranks share (DeepSpeed assumes the same).
"""
import copy
import json
import os
import shutil
import socket
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from common.checkpoint import STATE_FILE, list_checkpoints, rng_state, set_rng_state
from common.config import UserError


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_single_process_env():
    """DeepSpeed always wants a process group, and reads RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT.

    A launcher (deepspeed, torchrun) sets them; for a plain `python train.py` give them one-process defaults. The
    port of a one-process group is private to it, so it is always a fresh free one: an inherited MASTER_PORT (say,
    from a parent process that itself trained in-process) may still be held by that parent.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if not launched:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(free_port())
    elif "LOCAL_SIZE" in os.environ:  # the deepspeed launcher's name for it; setup_runtime splits cores by it
        os.environ["LOCAL_WORLD_SIZE"] = os.environ["LOCAL_SIZE"]


def quiet_deepspeed_warnings():
    """DeepSpeed 0.19 calls torch.distributed collectives by their deprecated names; torch warns on every step."""
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)


def read_ds_config(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--ds_config={path}: no such file")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"--ds_config={path}:{e.lineno}: malformed JSON ({e.msg})") from None
    if not isinstance(config, dict):
        raise UserError(f"--ds_config={path}: expected a JSON object")
    return config


def fill_ds_config(config: dict, owned: dict, source: str) -> dict:
    """Return a copy of `config` with the values the recipe's Config owns written in.

    owned: {"dotted.key": (value, "--flag that sets it")}. A key the JSON leaves out, or sets to "auto", takes the
    Config value; a JSON value that disagrees is an error, so it is never a guess which of the two files wins.
    The value None means "must not be in the JSON" (the recipe builds that part itself, e.g. the optimizer).
    """
    config = copy.deepcopy(config)
    for dotted, (value, flag) in owned.items():
        *parents, leaf = dotted.split(".")
        node = config
        for key in parents:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise UserError(f"{source}: '{key}' must be an object")
        present = node.get(leaf, "auto")
        if value is None:
            if leaf in node:
                raise UserError(f"{source}: remove '{dotted}'; train.py builds it from {flag}")
            continue
        if present != "auto" and present != value:
            raise UserError(f"{source}: '{dotted}' is {present!r} but {flag} gives {value!r}; the command line owns "
                            f"this value, so remove it from the JSON")
        node[leaf] = value
    return config


def weight_decay_groups(model, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: decay on matrices, none on norms and biases.

    Under ZeRO-3 a parameter's own shape is empty (its data is a partition); `ds_shape` is the real one, so use it,
    or every weight would look like a vector and escape decay.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            ndim = len(getattr(p, "ds_shape", p.shape))
            (no_decay if ndim < 2 or "norm" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def save_deepspeed_checkpoint(engine, output_dir, step: int, keep_last: int) -> Path:
    """engine.save_checkpoint into checkpoints/step_N atomically; every rank must call it. Returns the folder."""
    root = Path(output_dir) / "checkpoints"
    target, tmp = root / f"step_{step:08d}", root / f".step_{step:08d}.tmp"
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run that died while saving
        tmp.mkdir(parents=True)
    dist.barrier()
    engine.save_checkpoint(str(tmp), tag=f"global_step{step}")  # writes tmp/latest naming the tag
    rngs = [None] * dist.get_world_size()
    dist.all_gather_object(rngs, rng_state())
    if rank == 0:
        torch.save({"step": step, "world_size": len(rngs), "rng": rngs}, tmp / STATE_FILE)
        old = root / f".step_{step:08d}.old"
        if target.exists():  # a rerun into the same output_dir
            os.rename(target, old)
        os.rename(tmp, target)  # the one moment the checkpoint appears, complete
        shutil.rmtree(old, ignore_errors=True)
        for stale in list_checkpoints(output_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(stale, ignore_errors=True)
    dist.barrier()
    return target


def load_deepspeed_checkpoint(engine, folder: Path) -> int:
    """Restore module, optimizer partitions and scheduler (engine.load_checkpoint) and this rank's RNG state;
    returns the step the checkpoint was taken at. Every rank must call it."""
    load_path, _ = engine.load_checkpoint(str(folder))  # the tag comes from folder/latest
    if load_path is None:
        raise UserError(f"--resume: {folder} holds no DeepSpeed checkpoint (no 'latest' file)")
    state = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=False)  # our own file
    if state["world_size"] == dist.get_world_size():
        set_rng_state(state["rng"][dist.get_rank()])
    return state["step"]


def gather_full_state_dict(engine) -> dict | None:
    """The whole model's weights as CPU tensors on rank 0 (None on other ranks); every rank must call it.

    ZeRO-2 keeps the full weights in every rank's module. ZeRO-3 partitions them, so each module's parameters are
    gathered in turn (deepspeed.zero.GatheredParameters, the 16-bit gather DeepSpeed recommends for saving: the
    weights in the dtype the model trains in, fp32 on CPU) and copied to CPU before the next module is gathered.
    """
    import deepspeed

    module, rank = engine.module, dist.get_rank()
    if engine.zero_optimization_stage() < 3:
        return {k: v.detach().cpu() for k, v in module.state_dict().items()} if rank == 0 else None
    state_dict, seen = ({} if rank == 0 else None), {}

    def gather(mod, prefix):
        params = list(mod.parameters(recurse=False))
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            if rank == 0:
                for name, p in mod.named_parameters(recurse=False):
                    if p.ds_id in seen:  # tied weights stay one tensor
                        state_dict[prefix + name] = state_dict[seen[p.ds_id]]
                    else:
                        state_dict[prefix + name] = p.detach().cpu().clone()
                        seen[p.ds_id] = prefix + name
                for name, buf in mod.named_buffers(recurse=False):
                    if buf is not None and name not in mod._non_persistent_buffers_set:
                        state_dict[prefix + name] = buf.detach().cpu().clone()
        for name, child in mod.named_children():
            gather(child, prefix + name + ".")

    gather(module, "")
    return state_dict
