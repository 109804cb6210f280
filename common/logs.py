"""What a person reads while a run goes: the start-up block, one line per logged step, metrics.jsonl, TensorBoard
(by default) or wandb / mlflow (`--report_to`), a progress bar when the terminal is interactive, and loss.png at
the end. Only rank 0 writes; the other ranks get a logger that does nothing.
"""
import json
import math
import os
import resource
import sys
import time
import warnings
from pathlib import Path

import torch

REPORTERS = ("tensorboard", "wandb", "mlflow", "none")


def name_the_cpu_accelerator():
    """Without a GPU, tell DeepSpeed it runs on the CPU (DS_ACCELERATOR=cpu, unless set) before it is imported: found by
    its own detection instead, it warns "Setting accelerator to CPU" on every start (also where transformers imports it
    on its own). The start-up block names the device."""
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"


def quiet_third_party_logs():
    """Keep the step log readable: no per-file progress bars or info chatter from the libraries."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    name_the_cpu_accelerator()
    # peft still calls the transformers 4 names of the checkpointing switches; the warning is not for our users
    warnings.filterwarnings("ignore", message=r".*is deprecated and will be removed in v6", category=FutureWarning)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    import logging

    for name in ("DeepSpeed", "torch.distributed", "bitsandbytes"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # torchao (installed with gptqmodel, imported by transformers' quantizers) reports its GPU-only kernels failing
    # to load on CPU and torch warns about its enum registrations: noise on every start, nothing to act on
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # bitsandbytes on a CPU with AVX512-BF16 looks for an optional 4-bit kernel package fetched from a model hub; the
    # CPU runs here are the tiny checks, which never fetch anything
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def peak_memory_gb(device: torch.device | list[torch.device]) -> float:
    """Peak GPU memory allocated by torch's caching allocator on a CUDA device (the fullest of a list of them: a model
    split by layers over several GPUs fails when one GPU fills, so the maximum is what to watch, not the sum), else
    the process's peak resident memory (RSS)."""
    devices = device if isinstance(device, (list, tuple)) else [device]
    if devices[0].type == "cuda":
        return max(torch.cuda.max_memory_allocated(d) for d in devices) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # ru_maxrss is KiB on Linux


def memory_gb(device: torch.device | list[torch.device]) -> dict:
    """The step log's memory fields. On GPUs (the fullest of a list): mem_gb, the peak torch allocated; mem_reserved_gb,
    the peak its caching allocator reserved (allocated plus cached blocks: what the card must really hold);
    mem_used_gb, the card's used memory now (torch.cuda.mem_get_info), which also counts the CUDA context, other
    processes and the pages bitsandbytes' paged optimizers map in (managed memory torch does not see). On CPU only
    mem_rss_gb, the process's peak resident memory."""
    devices = device if isinstance(device, (list, tuple)) else [device]
    if devices[0].type != "cuda":
        return {"mem_rss_gb": peak_memory_gb(devices)}
    reserved = max(torch.cuda.max_memory_reserved(d) for d in devices)
    used = max(total - free for free, total in (torch.cuda.mem_get_info(d) for d in devices))
    return {"mem_gb": peak_memory_gb(devices), "mem_reserved_gb": reserved / 1e9, "mem_used_gb": used / 1e9}


def format_step(step: int, total: int, values: dict) -> str:
    parts = [f"step {step}/{total}"]
    for key, fmt in (("loss", "loss {:.4f}"), ("eval_loss", "eval_loss {:.4f}"),
                     ("reward_accuracy", "reward acc {:.3f}"), ("eval_reward_accuracy", "reward acc {:.3f}"),
                     ("reward_margin", "margin {:.3f}"), ("eval_reward_margin", "margin {:.3f}"), ("lr", "lr {:.1e}"),
                     ("grad_norm", "grad_norm {:.3f}"), ("tokens_per_s", "{:,.0f} tok/s"),
                     ("tokens_per_s_per_gpu", "{:,.0f} tok/s/gpu"), ("mfu", "mfu {:.1%}"),
                     ("mem_gb", "mem {:.2f} GB peak alloc"), ("mem_reserved_gb", "{:.2f} GB peak reserved"),
                     ("mem_used_gb", "{:.2f} GB used on GPU"), ("mem_rss_gb", "mem {:.2f} GB peak RSS")):
        if key in values and values[key] is not None:
            parts.append(fmt.format(values[key]))
    return " | ".join(parts)


class StepLogger:
    """Writes a step's metrics everywhere they belong. `enabled=False` (ranks > 0) makes every call a no-op.

    Build it once, when the run's total_steps is known (the bar's total and the "step N/total" lines use it), with
    --report_to as given ("none": metrics.jsonl only) and the config for wandb / mlflow. progress_bar: None shows the
    bar when stdout is a terminal; True or False forces it either way."""

    def __init__(self, output_dir, total_steps: int, report_to=("tensorboard",), enabled=True, run_name=None,
                 config: dict | None = None, progress_bar: bool | None = None):
        self.enabled, self.total_steps = enabled, total_steps
        self.output_dir = Path(output_dir)
        self.history: list[dict] = []
        self.bar = self.tb = self.wandb = self.mlflow = None
        if not enabled:
            return
        unknown = set(report_to) - set(REPORTERS)
        if unknown:
            from common.config import UserError

            raise UserError(f"--report_to: unknown {sorted(unknown)}; expected some of {', '.join(REPORTERS)}")
        report_to = [name for name in report_to if name != "none"]  # --report_to=none: metrics.jsonl only
        self.metrics_file = open(self.output_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115 (open for the run; close() closes it)
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(self.output_dir / "tensorboard"))
        if "wandb" in report_to:
            import wandb

            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "llama-train-recipes"), name=run_name,
                                    config=config)
        if "mlflow" in report_to:
            import mlflow

            mlflow.start_run(run_name=run_name)
            if config:
                mlflow.log_params({k: str(v)[:250] for k, v in config.items()})
            self.mlflow = mlflow
        show_bar = sys.stdout.isatty() if progress_bar is None else progress_bar
        if show_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, dynamic_ncols=True, leave=False)

    def info(self, text: str):
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def log(self, step: int, values: dict, echo=True):
        """Record metrics of `step`; echo=True prints the one-line step log."""
        if not self.enabled:
            return
        row = {"step": step, **{k: v for k, v in values.items() if v is not None}, "time": round(time.time(), 3)}
        self.history.append(row)
        self.metrics_file.write(json.dumps(row) + "\n")
        self.metrics_file.flush()
        numbers = {k: v for k, v in values.items() if isinstance(v, (int, float)) and v is not None}
        if self.tb is not None:
            for k, v in numbers.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(numbers, step=step)
        if self.mlflow is not None:
            self.mlflow.log_metrics(numbers, step=step)
        if echo:
            self.info(format_step(step, self.total_steps, values))

    def advance(self, n=1):
        if self.bar is not None:
            self.bar.update(n)

    def close(self):
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        self.metrics_file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.mlflow is not None:
            self.mlflow.end_run()
        plot_loss_curve(self.history, self.output_dir / "loss.png")


def plot_loss_curve(history: list[dict], path: Path):
    """Training (and eval) loss against step, as a PNG."""
    train = [(r["step"], r["loss"]) for r in history if "loss" in r and math.isfinite(r["loss"])]
    evals = [(r["step"], r["eval_loss"]) for r in history if "eval_loss" in r and math.isfinite(r["eval_loss"])]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
