"""Process setup: seeding, the device, threads per process and torch.distributed under torchrun."""
import functools
import os
import random
import signal
import socket
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0  # global rank
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def describe(self) -> str:
        cpu_name = f"CPU, {torch.get_num_threads()} threads"
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else cpu_name
        # the deepspeed launcher sets CROSS_RANK; torchrun does not
        launcher = "deepspeed launcher" if "CROSS_RANK" in os.environ else "torchrun"
        launcher = f"{launcher}, {self.world_size} processes" if self.distributed else "single process"
        return f"{self.device} ({name}), {launcher}"


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_single_process_env():
    """DeepSpeed and FSDP always want a process group, and read RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT.

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


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup_runtime(seed: int, cpu_offload: bool = False) -> Runtime:
    """Seed, pick the device and join the process group when launched by torchrun (process_group_backend)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        if "OMP_NUM_THREADS" not in os.environ:
            # N processes on C cores each default to C threads and oversubscribe badly: give each C / N
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend=process_group_backend(device.type, cpu_offload))
    seed_everything(seed)
    return Runtime(device=device, rank=rank, local_rank=local_rank, world_size=world_size)


def process_group_backend(device_type: str, cpu_offload: bool = False) -> str:
    """gloo on CPU, nccl on GPUs; GPUs with CPU-offloaded gradients (FSDP's cpu_offload) need both, one per device
    type, "cuda:nccl,cpu:gloo": the offloaded gradients are reduced on the CPU, where NCCL cannot (as torchtitan)."""
    if device_type != "cuda":
        return "gloo"
    return "cuda:nccl,cpu:gloo" if cpu_offload else "nccl"


SAVE_TIMEOUT_FLOOR = timedelta(minutes=30)


def save_timeout(checkpoint_bytes: int, write_bytes_per_s: float = 100e6) -> timedelta:
    """How long the other ranks wait for rank 0 to write a checkpoint or final model: twice the time to write it at a
    slow network file system's 100 MB/s, never under 30 minutes. NCCL's default 10 minutes would stop a 65B run
    while rank 0 writes its 130 GB bf16 model (about 22 minutes at that rate)."""
    seconds = 2 * checkpoint_bytes / write_bytes_per_s
    return max(SAVE_TIMEOUT_FLOOR, timedelta(seconds=seconds))


@functools.cache
def long_wait_group():
    """A gloo group beside the main one, for barriers with a timeout of their own (monitored_barrier needs gloo).
    Made at its first use, which every rank reaches together (a save)."""
    return dist.new_group(backend="gloo")


def wait_for_all(timeout: timedelta):
    """A barrier that waits up to `timeout` instead of the process group's limit: for ranks waiting while rank 0
    writes. Every rank must call it; nothing to wait for in one process."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    dist.monitored_barrier(group=long_wait_group(), timeout=timeout, wait_all_ranks=True)


LOSS_SCALING = ("grad_scaler", "deepspeed", "none")


@dataclass
class Precision:
    """How a run computes: `dtype` for autocast / the DeepSpeed or FSDP weights, `grad_scaler` whether the recipe's
    torch.amp.GradScaler is enabled (fp16 autocast), `reason` the start-up log's sentence."""
    dtype: torch.dtype
    grad_scaler: bool
    reason: str


def has_native_bf16(device: torch.device) -> bool:
    """Compute capability 8.0 (Ampere) or later. torch.cuda.is_bf16_supported() also counts the emulated bf16 of
    V100 / T4 / 2080, which trains several times slower than fp16 there."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


def training_precision(device: torch.device, loss_scaling: str) -> Precision:
    """bf16 on GPUs of compute capability >= 8.0, fp32 on CPU (CPU runs are for checking, and fp32 keeps them exact).
    Below 8.0 it depends on what the recipe can scale losses with (`loss_scaling`): "grad_scaler" (fp32 adapters or
    heads: fp16 autocast with torch.amp.GradScaler), "deepspeed" (DeepSpeed's fp16 with dynamic loss scaling) or
    "none" (FSDP: fp32)."""
    if loss_scaling not in LOSS_SCALING:
        raise ValueError(f"loss_scaling must be one of {LOSS_SCALING}, got {loss_scaling!r}")
    if device.type != "cuda":
        return Precision(torch.float32, False, f"fp32 ({device.type}: checking runs stay exact)")
    major, minor = torch.cuda.get_device_capability(device)
    capability = f"compute capability {major}.{minor}"
    if has_native_bf16(device):
        return Precision(torch.bfloat16, False, f"bf16 autocast ({capability})")
    if loss_scaling == "grad_scaler":
        return Precision(torch.float16, True, f"fp16 autocast + GradScaler ({capability}: no bf16)")
    if loss_scaling == "deepspeed":
        return Precision(torch.float16, False, f"DeepSpeed fp16 with dynamic loss scaling ({capability}: no bf16)")
    return Precision(torch.float32, False, f"fp32 ({capability}: no bf16, and FSDP here keeps no loss scaler)")


def all_reduce_sum(values: list[float], runtime: Runtime, group=None) -> list[float]:
    """Sum a few numbers over all ranks, or over the ranks of `group` (identity in a single process)."""
    if not runtime.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=runtime.device)
    dist.all_reduce(t, group=group)
    return t.tolist()


def cleanup(runtime: Runtime):
    if runtime.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


@dataclass
class StopRequest:
    """Set by SIGTERM (a scheduler's preemption notice) or SIGINT (Ctrl-C): the signal's name, '' until one comes."""
    signal: str = ""
    previous: dict = None

    def restore(self):
        for signum, handler in (self.previous or {}).items():
            signal.signal(signum, handler)


def catch_stop_signals() -> StopRequest:
    """Turn SIGTERM and SIGINT into a request the training loop honours after the current step (it saves a
    checkpoint, says where, and exits cleanly); a second Ctrl-C stops at once."""
    request = StopRequest(previous={s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)})

    def handler(signum, frame):
        if request.signal and signum == signal.SIGINT:
            raise KeyboardInterrupt
        request.signal = signal.Signals(signum).name

    for signum in request.previous:
        signal.signal(signum, handler)
    return request


def stop_requested(request: StopRequest, runtime: "Runtime") -> bool:
    """Whether any rank was asked to stop: all ranks must save the checkpoint together, so they agree first."""
    (asked,) = all_reduce_sum([1.0 if request.signal else 0.0], runtime)
    return asked > 0
