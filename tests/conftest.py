import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # the README's command runs two pytest-xdist workers on CI's 2 cores: each worker, and every run it starts, keeps
    # to one thread (two workers of 2 threads each spin against each other: runs up to 10x slower were measured)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def tiny_dir():
    from common.model import materialize_tiny_llama

    return materialize_tiny_llama()


@pytest.fixture(scope="session")
def tokenizer(tiny_dir):
    from common.model import load_tokenizer

    return load_tokenizer(tiny_dir)


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    from common.model import load_model

    return load_model(tiny_dir, "none", torch.float32).eval()


def run_script(script: Path, *args: str, timeout=600, env_extra=None, cwd=None) -> subprocess.CompletedProcess:
    """Run a recipe's run.sh (or any script) as a user would, from `cwd` (default: the script's folder); output
    captured for the assertion message."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1", **(env_extra or {})}
    cmd = ["bash", str(script), *args] if script.suffix == ".sh" else [sys.executable, str(script), *args]
    # its own process group: a launcher's ranks are stopped with it, never left running into the next test
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=cwd or script.parent, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stdout, stderr = stop_with_stacks(proc)
        pytest.fail(f"{script} ran past {timeout} s; where each process stood:\n"
                    f"{stdout[-4000:]}\n{stderr[-12000:]}", pytrace=False)
    except BaseException:  # Ctrl-C: the run's group is outside the terminal's, so it is stopped here
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def stop_with_stacks(proc: subprocess.Popen) -> tuple[str, str]:
    """SIGABRT to the run's process group: with PYTHONFAULTHANDLER set, every Python process in it (launcher and
    ranks) prints the stack of each of its threads before it dies; then SIGKILL whatever is left."""
    os.killpg(proc.pid, signal.SIGABRT)
    try:
        stdout, stderr = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # ranks the launcher did not take down with it
    return stdout, stderr


def load_recipe(folder: Path):
    """Import a recipe's train.py under a unique module name (every recipe has a train.py)."""
    import importlib.util

    name = "recipe_" + "_".join(folder.relative_to(REPO).parts).replace("-", "_")
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, folder / "train.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def read_jsonl(path) -> list[dict]:
    """The records of a .jsonl file (predictions.jsonl, a data file), blank lines skipped."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def read_metrics(out) -> list[dict]:
    """The rows of a run's metrics.jsonl."""
    return read_jsonl(Path(out) / "metrics.jsonl")


def nan_on_call(n, real):
    """A loss function that is `real` except on its n-th call (the n-th micro-batch), where its loss is nan; for a
    function that returns a tuple (losses, *more), the first element."""
    calls = {"count": 0}

    def loss(*a, **k):
        calls["count"] += 1
        value = real(*a, **k)
        if calls["count"] != n:
            return value
        if isinstance(value, tuple):
            return (value[0] * float("nan"), *value[1:])
        return value * float("nan")
    return loss
