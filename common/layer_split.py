"""Splitting one model by whole decoder layers over the GPUs of one process (`--device_map=auto`): parse the
per-GPU memory caps, plan the split on a meta-device skeleton in a second or two without reading a weight, refuse a
plan that would spill to CPU or disk, and describe the plan for the start-up log.
"""
import torch

from common.config import UserError

MEMORY_UNITS = {"GIB": 2**30, "MIB": 2**20, "GB": 10**9, "MB": 10**6}


def parse_memory_sizes(text: str) -> list[int]:
    """'22GiB' -> [23622320128]; '10GiB,22GiB' -> one size per GPU; units GiB, MiB, GB, MB (any case)."""
    sizes = []
    for part in text.split(","):
        number, unit = part.strip(), ""
        for name in MEMORY_UNITS:
            if number.upper().endswith(name):
                number, unit = number[: -len(name)].strip(), name
                break
        try:
            size = int(float(number) * MEMORY_UNITS[unit]) if unit else -1
        except ValueError:
            size = -1
        if size <= 0:
            raise UserError(f"--max_memory_per_gpu={text}: expected a size per GPU like 22GiB (units GiB, MiB, GB, "
                              "MB), or one per visible GPU: 10GiB,22GiB")
        sizes.append(size)
    return sizes


def layer_split_device_map(device_map: str, max_memory_per_gpu: str, device: torch.device,
                           world_size: int) -> tuple[dict | str | None, dict | None]:
    """(device_map, max_memory) for load_model / load_gptq_model from a recipe's --device_map and
    --max_memory_per_gpu. 'single': the whole model on this process's device (None on CPU). 'auto': 'auto' and a
    byte cap per visible GPU (the --max_memory_per_gpu, or what is free now), with 0 for the CPU: weights spilling
    to the CPU would train about 100x slower, so they are an error instead."""
    if device_map not in ("single", "auto"):
        raise UserError(f"--device_map={device_map}: expected single or auto")
    if device_map == "single":
        if max_memory_per_gpu:
            raise UserError(f"--max_memory_per_gpu={max_memory_per_gpu}: only used with --device_map=auto")
        return ({"": device} if device.type == "cuda" else None), None
    caps = parse_memory_sizes(max_memory_per_gpu) if max_memory_per_gpu else None
    if world_size > 1:
        raise UserError(f"--device_map=auto with {world_size} processes: layer split runs in one process; use "
                          "NGPU=1 with several visible GPUs (CUDA_VISIBLE_DEVICES=0,1)")
    if device.type != "cuda":
        raise UserError("--device_map=auto needs GPUs (it spreads the layers over the visible GPUs) and none is "
                          "visible; use --device_map=single")
    n_gpus = torch.cuda.device_count()
    if caps is None:
        from accelerate.utils import get_max_memory

        free = get_max_memory()  # bytes free on each GPU now: accelerate's own default
        caps = [free[i] for i in range(n_gpus)]
    elif len(caps) == 1:
        caps = caps * n_gpus
    elif len(caps) != n_gpus:
        raise UserError(f"--max_memory_per_gpu={max_memory_per_gpu}: {len(caps)} sizes for {n_gpus} visible GPUs; "
                          "give one size for all or one per GPU")
    return "auto", {**dict(enumerate(caps)), "cpu": 0}


def meta_model(config, dtype=torch.bfloat16, quantization_config=None, model_class=None, attn_implementation="sdpa"):
    """(model, quantizer): the model skeleton on the meta device (no memory, no weights read) with its layers
    replaced by the quantized ones as from_pretrained does before loading, so sizes can be measured on it.
    quantization_config: a BitsAndBytesConfig, or None for the checkpoint's own (GPTQ) or none."""
    import copy

    from transformers import AutoModelForCausalLM
    from transformers.quantizers import AutoHfQuantizer

    config = copy.deepcopy(config)
    with torch.device("meta"):
        model = (model_class or AutoModelForCausalLM).from_config(config, dtype=dtype,
                                                                  attn_implementation=attn_implementation)
    quantization = quantization_config or getattr(config, "quantization_config", None)
    quantizer = None
    if quantization is not None:
        quantizer = AutoHfQuantizer.from_config(copy.deepcopy(quantization), pre_quantized=quantization_config is None)
        quantizer.preprocess_model(model=model, dtype=dtype, device_map="auto", checkpoint_files=None,
                                   use_kernels=False)
    return model, quantizer


def plan_layer_split(config, max_memory: dict, dtype=torch.bfloat16, quantization_config=None,
                     model_class=None) -> dict:
    """The device map from_pretrained(device_map='auto', max_memory=max_memory) would choose, computed in a second
    or two without reading a weight, through the same steps: the quantized skeleton (`meta_model`: bitsandbytes NF4
    counts half a byte per weight, a GPTQ checkpoint's packed buffers count as stored), memory balanced over the
    GPUs (each but the last gets about an equal share, at most its cap; the last takes the rest up to its cap), the
    quantizer's headroom (bitsandbytes keeps 10%), then accelerate's placement of whole decoder layers in order, GPU 0
    first. Modules that do not fit go to 'cpu' or 'disk'."""
    from transformers.integrations.accelerate import get_balanced_memory, infer_auto_device_map

    model, quantizer = meta_model(config, dtype, quantization_config, model_class)
    memory = get_balanced_memory(model, dict(max_memory), model._no_split_modules, quantizer)
    if quantizer is not None:
        memory = quantizer.adjust_max_memory(memory)
    return dict(infer_auto_device_map(model, memory, model._no_split_modules, hf_quantizer=quantizer))


def raise_if_layer_split_spills(plan: dict, max_memory: dict):
    """A UserError, one line, when a plan puts any module on the CPU or the disk (the model does not fit)."""
    spilled = [name for name, device in plan.items() if device in ("cpu", "disk")]
    if not spilled:
        return
    caps = [size for device, size in max_memory.items() if isinstance(device, int)]
    unit, scale, digits = ("MiB", 2**20, 0) if max(caps) < 2**30 else ("GiB", 2**30, 1)  # under 1 GiB: not 0.0 GiB
    allowed = ", ".join(f"{size / scale:.{digits}f}" for size in caps)
    raise UserError(f"the model does not fit on {len(caps)} GPU(s) with {allowed} {unit} allowed per GPU "
                    f"(--max_memory_per_gpu): {summarize_modules(spilled)} would be offloaded to CPU/disk; try more "
                    "GPUs (CUDA_VISIBLE_DEVICES), a larger --max_memory_per_gpu, or a 4-bit base")


def fitting_layer_split(config, max_memory: dict, dtype=torch.bfloat16, quantization_config=None,
                        model_class=None) -> dict:
    """plan_layer_split, then raise_if_layer_split_spills: the plan to load, or a UserError saying it does not fit."""
    plan = plan_layer_split(config, max_memory, dtype, quantization_config, model_class)
    raise_if_layer_split_spills(plan, max_memory)
    return plan


def summarize_modules(names) -> str:
    """['model.embed_tokens', 'model.layers.0', ..., 'model.layers.35'] -> 'layers 0-35 + embed_tokens'."""
    layers = [int(n.rsplit(".", 1)[-1]) for n in names if n.rsplit(".", 1)[-1].isdigit()]
    others = [n.rsplit(".", 1)[-1] or "the whole model" for n in names if not n.rsplit(".", 1)[-1].isdigit()]
    text = f"layers {min(layers)}-{max(layers)}" if layers else ""
    return " + ".join(part for part in (text, ", ".join(others)) if part)


def describe_layer_split(plan: dict) -> str:
    """'cuda:0 layers 0-35 + embed_tokens | cuda:1 layers 36-79 + norm, rotary_emb, lm_head' for the start-up log."""
    devices = dict.fromkeys(plan.values())  # in plan order
    return " | ".join(f"{f'cuda:{d}' if isinstance(d, int) else d} "
                      f"{summarize_modules([n for n, on in plan.items() if on == d])}" for d in devices)
