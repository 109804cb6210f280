"""common/gptq.py: where quantizing loads the full-precision model (host RAM, also with a GPU)."""
import pytest
import torch

from common.gptq import import_gptqmodel, quantize_gptq, quantize_placement


def test_quantize_placement_loads_into_host_ram_with_or_without_a_gpu():
    with_gpu, without_gpu = quantize_placement(True), quantize_placement(False)
    assert with_gpu.device_map == {"": "cpu"} and without_gpu.device_map == {"": "cpu"}
    assert with_gpu.dtype == torch.float16 and without_gpu.dtype == torch.float32
    assert "GPU 0" in with_gpu.compute and without_gpu.compute == "CPU"


class LoadStopped(Exception):
    pass


def test_quantize_gptq_with_a_gpu_loads_the_model_on_cpu_in_fp16(monkeypatch, tmp_path, tiny_dir):
    """With a (faked) GPU, from_pretrained gets a CPU device map: optimum's GPTQ loop then moves one block at a time
    to the GPU, instead of the whole model sitting on GPU 0."""
    from transformers import AutoModelForCausalLM

    seen = {}

    def recording_from_pretrained(*args, **kwargs):
        seen.update(kwargs)
        raise LoadStopped

    # imported for real first: imported while the GPU is faked, bitsandbytes half-loads (no bitsandbytes.nn) and
    # every later 4-bit test in the session fails
    import bitsandbytes  # noqa: F401
    import_gptqmodel()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", recording_from_pretrained)
    with pytest.raises(LoadStopped):
        quantize_gptq(tiny_dir, tmp_path / "q", calibration_texts=["some calibration text"], seq_len=16, n_samples=1)
    assert seen["device_map"] == {"": "cpu"} and seen["dtype"] == torch.float16
    assert seen["quantization_config"].bits == 4
