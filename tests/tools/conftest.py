"""Trained tiny adapters and merged models shared by the tools/ tests: trained in-process once per session with the
recipes themselves (two steps, a high learning rate so the adapters change the logits), and the tools' scripts
imported as modules so most tests call main(argv) without a new interpreter."""
import contextlib
import importlib.util
import os
import sys

import pytest
import torch

from tests.conftest import REPO, load_recipe

TOOLS = REPO / "tools"


def load_tool(name: str):
    """Import tools/<name>.py under a unique module name."""
    module_name = f"tool_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def one_thread():
    """The tiny model gains nothing from a second thread, and on a busy 2-core machine spinning threads made
    generation 100x slower (13 s against 0.1 s); OMP_NUM_THREADS also reaches recipes (setup_runtime) and children."""
    before, env_before = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        yield
    finally:
        torch.set_num_threads(before)
        if env_before is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = env_before


@pytest.fixture(autouse=True)
def single_threaded():
    with one_thread():
        yield


def train(recipe: str, out, *args):
    module = load_recipe(REPO / recipe)
    argv = [f"--output_dir={out}", "--max_steps=2", "--report_to=none", "--eval_data_path=", "--grad_accum=1", *args]
    with one_thread():
        return module.main(module.parse_config(module.Config, argv))["final_dir"]


@pytest.fixture(scope="session")
def sft_adapter(tmp_path_factory):
    """sft/qlora's out/final: LoRA trained on the NF4 tiny base."""
    return train("sft/qlora", tmp_path_factory.mktemp("sft") / "out", "--batch_size=4", "--lr=1e-2", "--lora_r=8")


@pytest.fixture(scope="session")
def cls_adapter(tmp_path_factory):
    """cls/qlora's out/final: LoRA + score head on the NF4 tiny base, 3 classes, labels.json."""
    return train("cls/qlora", tmp_path_factory.mktemp("cls") / "out", "--batch_size=8", "--lr=1e-2", "--lora_r=8")


@pytest.fixture(scope="session")
def merged_sft(sft_adapter, tmp_path_factory):
    out = tmp_path_factory.mktemp("merged") / "sft"
    with one_thread():
        load_tool("merge_lora").main(["--base=tiny", f"--adapter={sft_adapter}", f"--out={out}"])
    return out


@pytest.fixture(scope="session")
def merged_cls(cls_adapter, tmp_path_factory):
    out = tmp_path_factory.mktemp("merged") / "cls"
    with one_thread():
        load_tool("merge_lora").main(["--base=tiny", f"--adapter={cls_adapter}", f"--out={out}"])
    return out
