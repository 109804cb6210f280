"""Layer split (--device_map=auto): what the recipes pass to from_pretrained, the one-line errors, and the plan on
the meta device: Llama 65B in NF4 fits two 24 GB cards with its layers split in order, and does not fit one."""
import re

import pytest
import torch

from common.config import UserError
from common.layer_split import (
    describe_layer_split,
    fitting_layer_split,
    layer_split_device_map,
    meta_model,
    plan_layer_split,
    raise_if_layer_split_spills,
)
from common.model import MODEL_CONFIGS, bnb_quantization_config
from tests.conftest import REPO, run_script

GIB = 2**30
CPU, GPU0 = torch.device("cpu"), torch.device("cuda", 0)


@pytest.fixture
def two_gpus(monkeypatch):
    """torch sees two GPUs (only the count is asked for: nothing touches CUDA)."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def test_single_is_todays_placement():
    assert layer_split_device_map("single", "", CPU, 1) == (None, None)
    assert layer_split_device_map("single", "", GPU0, 1) == ({"": GPU0}, None)
    assert layer_split_device_map("single", "", GPU0, 4) == ({"": GPU0}, None)  # DDP: one model per process


def test_auto_caps_every_visible_gpu_and_gives_the_cpu_nothing(two_gpus):
    assert layer_split_device_map("auto", "22GiB", GPU0, 1) == ("auto", {0: 22 * GIB, 1: 22 * GIB, "cpu": 0})
    assert layer_split_device_map("auto", "10GiB, 22.5gib", GPU0, 1) == ("auto", {0: 10 * GIB, 1: int(22.5 * GIB),
                                                                                  "cpu": 0})
    assert layer_split_device_map("auto", "20GB", GPU0, 1)[1] == {0: 20 * 10**9, 1: 20 * 10**9, "cpu": 0}


@pytest.mark.parametrize("device_map,cap,device,world_size,message", [
    ("auto", "22GiB", CPU, 1, "--device_map=auto needs GPUs"),
    ("auto", "22GiB", GPU0, 2, "--device_map=auto with 2 processes: layer split runs in one process; use NGPU=1"),
    ("auto", "22", GPU0, 1, "--max_memory_per_gpu=22: expected a size per GPU like 22GiB"),
    ("auto", "lots", CPU, 1, "--max_memory_per_gpu=lots: expected a size per GPU like 22GiB"),
    ("auto", "0GiB", GPU0, 1, "--max_memory_per_gpu=0GiB: expected a size per GPU like 22GiB"),
    ("auto", "22GiB,", GPU0, 1, "--max_memory_per_gpu=22GiB,: expected a size per GPU like 22GiB"),
    ("auto", "8GiB,8GiB,8GiB", GPU0, 1, "--max_memory_per_gpu=8GiB,8GiB,8GiB: 3 sizes for 2 visible GPUs"),
    ("single", "22GiB", GPU0, 1, "--max_memory_per_gpu=22GiB: only used with --device_map=auto"),
    ("pipeline", "", GPU0, 1, "--device_map=pipeline: expected single or auto"),
])
def test_bad_values_are_one_line_config_errors_naming_the_field(two_gpus, device_map, cap, device, world_size,
                                                                 message):
    with pytest.raises(UserError, match=re.escape(message)) as error:
        layer_split_device_map(device_map, cap, device, world_size)
    assert "\n" not in str(error.value)


def test_describe_layer_split():
    plan = {"model.embed_tokens": 0, **{f"model.layers.{i}": 0 if i < 3 else 1 for i in range(8)},
            "model.norm": 1, "lm_head": 1}
    assert describe_layer_split(plan) == "cuda:0 layers 0-2 + embed_tokens | cuda:1 layers 3-7 + norm, lm_head"
    assert describe_layer_split({"": 0}) == "cuda:0 the whole model"


# ---- planning Llama 65B in NF4 (bf16 compute, as on a GPU) on the meta device: no memory, no weights


@pytest.fixture(scope="module")
def llama_65b():
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(MODEL_CONFIGS["65b"]), bnb_quantization_config("nf4", torch.bfloat16)


def layer_devices(plan: dict, n_layers: int) -> list:
    """The device of each decoder layer: its own entry, or that of the nearest enclosing module in the plan."""
    def device_of(name):
        while name not in plan:
            name = name.rsplit(".", 1)[0] if "." in name else ""
        return plan[name]
    return [device_of(f"model.layers.{i}") for i in range(n_layers)]


def test_65b_nf4_fits_two_24gb_gpus_split_by_layers_in_order(llama_65b):
    from transformers.integrations.accelerate import compute_module_sizes

    config, nf4 = llama_65b
    max_memory = {0: 22 * GIB, 1: 22 * GIB, "cpu": 0}
    plan = plan_layer_split(config, max_memory, torch.bfloat16, nf4)
    devices = layer_devices(plan, config.num_hidden_layers)
    assert set(devices) == {0, 1} and set(plan.values()) == {0, 1}  # both GPUs, nothing on cpu or disk
    k = devices.count(0)
    assert devices == [0] * k + [1] * (config.num_hidden_layers - k)  # layers 0..k-1 on GPU 0, the rest on GPU 1
    assert plan["model.embed_tokens"] == 0 and plan["lm_head"] == 1
    raise_if_layer_split_spills(plan, max_memory)  # no error
    # the bytes placed on each GPU (NF4 weights at half a byte, the rest bf16) stay under the cap with the 10% that
    # bitsandbytes keeps for its quantization buffers
    model, quantizer = meta_model(config, torch.bfloat16, nf4)
    sizes, _ = compute_module_sizes(model, quantizer)
    placed = {gpu: sum(sizes[name] for name, on in plan.items() if on == gpu) for gpu in (0, 1)}
    assert all(placed[gpu] <= 0.9 * 22 * GIB for gpu in (0, 1)), placed
    assert sum(placed.values()) == sizes[""] and 30 * GIB < sizes[""] < 32 * GIB  # 65B at 4 bits: about 31 GiB


def test_65b_nf4_does_not_fit_one_24gb_gpu(llama_65b):
    config, nf4 = llama_65b
    max_memory = {0: 22 * GIB, "cpu": 0}
    devices = layer_devices(plan_layer_split(config, max_memory, torch.bfloat16, nf4), config.num_hidden_layers)
    assert devices[0] == 0 and "disk" in devices  # the first layers on the GPU, the rest spilled
    with pytest.raises(UserError, match=re.escape("the model does not fit on 1 GPU(s) with 22.0 GiB allowed per GPU "
                                                  "(--max_memory_per_gpu): layers ")) as error:
        fitting_layer_split(config, max_memory, torch.bfloat16, nf4)
    assert "try more GPUs" in str(error.value) and "\n" not in str(error.value)


def test_gptq_checkpoint_is_planned_with_its_packed_layers():
    """The GPTQ loader plans the same way, with the checkpoint's own quantization_config (the tiny GPTQ Llama)."""
    from transformers import AutoConfig

    from common.gptq import import_gptqmodel, materialize_tiny_gptq

    import_gptqmodel()
    config = AutoConfig.from_pretrained(materialize_tiny_gptq(), local_files_only=True)
    config.quantization_config = {**dict(config.quantization_config), "backend": "auto_trainable"}
    assert fitting_layer_split(config, {0: GIB, "cpu": 0}, torch.float32) == {"": 0}
    with pytest.raises(UserError, match="does not fit on 2 GPU"):
        fitting_layer_split(config, {0: 2**20, 1: 2**20, "cpu": 0}, torch.float32)


# ---- through run.sh


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
@pytest.mark.parametrize("recipe", ["sft/qlora", "sft/peft-int4", "cls/qlora", "cls/peft-int4", "cls/reward-qlora"])
def test_device_map_auto_without_a_gpu_is_one_line_before_anything_is_written(recipe, tmp_path):
    out = tmp_path / "out"
    proc = run_script(REPO / recipe / "run.sh", "--device_map=auto", "--max_memory_per_gpu=22GiB",
                      f"--output_dir={out}", timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == ("error: --device_map=auto needs GPUs (it spreads the layers over "
                                                    "the visible GPUs) and none is visible; use --device_map=single")
    assert not out.exists()
