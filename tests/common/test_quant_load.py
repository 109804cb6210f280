"""common/quant_load.py: a 4-bit model built on the meta device and filled one layer at a time is the model
from_pretrained makes, byte for byte, and loading it stays far below the full-precision size in host RAM."""
import importlib.util

import pytest
import torch

from tests.conftest import REPO


def load_bench(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_layer_by_layer_load_is_byte_identical_to_from_pretrained(tiny_dir):
    from common.model import disable_bnb_cpu_inference_repack, load_model
    from common.quant_load import build_4bit_model_on_meta, load_4bit_weights

    reference = load_model(tiny_dir, "nf4", torch.float32).eval()
    model = build_4bit_model_on_meta(tiny_dir, torch.float32)
    load_4bit_weights(model, tiny_dir, torch.device("cpu"))
    disable_bnb_cpu_inference_repack(model)
    model.eval()
    expected, got = reference.state_dict(), model.state_dict()
    assert set(got) == set(expected)
    differing = [k for k in expected if not torch.equal(got[k], expected[k])]
    assert not differing, differing
    assert not any(t.device.type == "meta" for t in [*model.parameters(), *model.buffers()])
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)
    # a no-grad forward (an eval) leaves the weights as they were: training after it computes on the same model
    model.train(), reference.train()
    assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_lora_added_on_meta_is_initialized_per_layer_and_starts_as_the_base(tiny_dir):
    from common.model import add_lora
    from common.quant_load import build_4bit_model_on_meta, load_4bit_weights

    def build(seed):
        model = add_lora(build_4bit_model_on_meta(tiny_dir, torch.float32, torch.float32), 8, 16, 0.0, "all-linear")
        load_4bit_weights(model, tiny_dir, torch.device("cpu"), seed=seed)
        return model

    a, b, c = build(1), build(1), build(2)

    def lora_a(model):
        return [p for n, p in model.named_parameters() if "lora_A" in n]

    assert all(torch.equal(x, y) for x, y in zip(lora_a(a), lora_a(b)))  # every rank builds the same adapters
    assert not torch.equal(lora_a(a)[0], lora_a(c)[0])
    assert all(float(p.std()) > 0 for p in lora_a(a))
    assert all(float(p.abs().max()) == 0 for n, p in a.named_parameters() if "lora_B" in n)


def test_a_checkpoint_without_safetensors_is_a_clear_error(tmp_path):
    from common.config import UserError
    from common.quant_load import checkpoint_tensor_files

    with pytest.raises(UserError, match="no model.safetensors"):
        checkpoint_tensor_files(tmp_path)


@pytest.mark.slow  # measures the peak of a whole 4-bit load
def test_loading_in_4bit_peaks_far_below_the_fp32_size(tmp_path):
    """A 158M-parameter Llama (605 MB in fp32) loaded layer by layer into NF4 in a fresh process: anonymous memory
    (what is really taken, not the memory-mapped file) peaks under a quarter of the fp32 size (0.21 measured,
    2026-11-24) and ends near the 4-bit size."""
    bench = load_bench("load_memory")
    model_dir = bench.make_mid_llama(tmp_path / "mid-llama")
    result = bench.measure(model_dir, "nf4-layerwise")
    assert 550 < result["checkpoint_mb"] < 650
    assert result["added_peak_mb"] < 0.25 * result["checkpoint_mb"], result
    assert result["added_after_mb"] < 0.15 * result["checkpoint_mb"], result


def test_the_storage_dtype_changes_the_container_not_the_4bit_bytes(tiny_dir):
    """FSDP shards a parameter as its dtype: the packed NF4 bytes stored as bf16 (the GPU compute dtype) are the very
    bytes of the uint8 layout, so a bf16 gather moves them untouched."""
    from common.quant_load import build_4bit_model_on_meta, load_4bit_weights

    weights = {}
    for storage in (torch.uint8, torch.bfloat16):
        model = build_4bit_model_on_meta(tiny_dir, torch.bfloat16, storage)
        load_4bit_weights(model, tiny_dir, torch.device("cpu"))
        weights[storage] = model.model.layers[0].mlp.up_proj.weight
    assert weights[torch.bfloat16].dtype == torch.bfloat16
    assert torch.equal(weights[torch.bfloat16].data.view(torch.uint8).flatten(), weights[torch.uint8].data.flatten())
