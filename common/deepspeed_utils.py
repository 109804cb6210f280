"""What every DeepSpeed recipe needs around its engine: the DeepSpeed config with the values the recipe's Config owns
written in, checkpoints that are never half-written (common/checkpoint.py:save_sharded_checkpoint), and the whole
model gathered for a Hugging Face save. (The process group of a lone `python train.py` is
common/runtime.py:set_single_process_env; weight-decay groups that survive ZeRO-3 are in common/optim.py.)

Checkpoint layout (the same names as common/checkpoint.py, so `latest_checkpoint` finds them):
    output_dir/checkpoints/step_00000040/
        latest, global_step40/...    DeepSpeed's own files: every rank's optimizer partition, the module, scheduler
        zero_to_fp32.py              DeepSpeed's script that merges the partitions into one fp32 state dict
        trainer_state.pt             step and every rank's RNG state; written last, by rank 0
Every rank writes into checkpoints/.step_00000040.tmp; rank 0 renames it into place once all ranks are done. The
folder must therefore be on a file system all ranks share (DeepSpeed assumes the same).
"""
import atexit
import contextlib
import copy
import io
import json
import os
import re
import warnings
from pathlib import Path

import torch.distributed as dist

from common.checkpoint import load_sharded_trainer_state, save_sharded_checkpoint
from common.config import UserError
from common.logs import name_the_cpu_accelerator

name_the_cpu_accelerator()  # on import: the DeepSpeed recipes import this module before they import deepspeed


def init_distributed():
    """deepspeed.init_distributed() without the line it prints when its CPU shared-memory all-reduce loads
    ("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully", a bare print); anything else it prints
    is shown as it was. Every rank calls it; each removes its shared-memory buffer when its process exits."""
    import deepspeed

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        deepspeed.init_distributed()
    for line in printed.getvalue().splitlines():
        if not re.fullmatch(r"DeepSpeed \S+ built successfully", line):
            print(line, flush=True)
    atexit.register(shm_all_reduce_buffer().unlink, missing_ok=True)  # named now: a later run here gets a new port


def shm_all_reduce_buffer(shm_dir: Path = Path("/dev/shm")) -> Path:
    """This rank's file of DeepSpeed's CPU shared-memory all-reduce (deepspeed/ops/csrc/cpu/comm/shm.cpp): 69 MB of
    RAM-backed /dev/shm per rank of a multi-process CPU run, named by user, MASTER_ADDR, MASTER_PORT and rank, that
    DeepSpeed 0.19 never unlinks: without removal every such run leaves them behind until reboot."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return shm_dir / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{os.environ.get('RANK', '0')}"


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


def save_deepspeed_checkpoint(engine, output_dir, step: int, keep_last: int) -> Path:
    """engine.save_checkpoint into checkpoints/step_N atomically; every rank must call it. Returns the folder."""
    return save_sharded_checkpoint(output_dir, step, keep_last,
                                   lambda tmp: engine.save_checkpoint(str(tmp), tag=f"global_step{step}"))


def load_deepspeed_checkpoint(engine, folder: Path) -> int:
    """Restore module, optimizer partitions and scheduler (engine.load_checkpoint) and this rank's RNG state;
    returns the step the checkpoint was taken at. Every rank must call it."""
    load_path, _ = engine.load_checkpoint(str(folder))  # the tag comes from folder/latest
    if load_path is None:
        raise UserError(f"--resume: {folder} holds no DeepSpeed checkpoint (no 'latest' file)")
    return load_sharded_trainer_state(folder)["step"]


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
