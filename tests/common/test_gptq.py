"""common/gptq.py: where quantizing loads the full-precision model (host RAM, also with a GPU); the default tiny GPTQ
model quantized without bars on screen."""
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


@pytest.mark.slow
def test_the_default_tiny_gptq_model_is_quantized_without_a_progress_bar_on_screen(monkeypatch, tmp_path, capsys):
    """The first default run of a peft-int4 recipe on a machine quantizes the tiny model (a few seconds): its screen
    still starts with the recipe's start-up block, not optimum's per-block bars."""
    from common.gptq import gptq_quantization_config, materialize_tiny_gptq

    monkeypatch.setenv("LLAMA_RECIPES_CACHE", str(tmp_path))
    folder = materialize_tiny_gptq()
    printed = capsys.readouterr()
    assert "Quantizing" not in printed.out + printed.err, printed.err[-2000:]
    assert gptq_quantization_config(folder)["bits"] == 4 and (folder / "model.safetensors").is_file()
