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
import copy
import json
import warnings
from pathlib import Path

import torch.distributed as dist

from common.checkpoint import load_sharded_trainer_state, save_sharded_checkpoint
from common.config import UserError
from common.logs import name_the_cpu_accelerator

name_the_cpu_accelerator()  # on import: the DeepSpeed recipes import this module before they import deepspeed


SHM_COMM_OP = "deepspeed_shm_comm"  # ShareMemCommBuilder.NAME (deepspeed/ops/op_builder/cpu/comm.py)


def init_distributed():
    """deepspeed.init_distributed() without DeepSpeed's CPU shared-memory all-reduce op. That op serves only
    inference_all_reduce (AutoTP inference), which training never calls: the collectives of training are gloo's on
    CPU and NCCL's on GPUs with it or without it. Loaded, it cost a gcc build on a machine's first run (24-60 s),
    69 MB of /dev/shm per rank that DeepSpeed 0.19 never removes, a spin-wait at start for every other rank's
    buffer, and a build lock that a process killed while loading it leaves behind: then every later run waits on
    it forever without a word."""
    import deepspeed

    deepspeed.ops.__compatible_ops__[SHM_COMM_OP] = False  # DeepSpeed's build_shm_op reads this; no build, no shm
    deepspeed.init_distributed()


def build_cpu_adam(groups: list[dict], lr: float, betas: tuple[float, float]):
    """DeepSpeedCPUAdam (AdamW mode) over `groups`: the optimizer ZeRO's CPU offload requires. Its C++ op is
    compiled with gcc into TORCH_EXTENSIONS_DIR on a machine's first run (60-90 s) under a lock file; torch waits
    for that lock with no message, forever when a build was interrupted (Ctrl-C, a killed rank) and left it."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    say_if_build_is_locked("cpu_adam")
    return DeepSpeedCPUAdam(groups, lr=lr, betas=betas, adamw_mode=True)


def say_if_build_is_locked(op_name: str):
    """Print one line when the JIT build folder of `op_name` holds torch's lock file, before torch waits on it."""
    from torch.utils.cpp_extension import _get_build_directory

    lock = Path(_get_build_directory(op_name, verbose=False)) / "lock"
    if lock.exists():
        print(f"waiting for {lock}: another process is compiling {op_name}, or a compile was interrupted and left "
              "the lock behind (then no run gets past this point: delete the file)", flush=True)


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
