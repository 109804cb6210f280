"""Loading a checkpoint into 4-bit NF4 one decoder layer at a time, from the meta device.

The model is first built on the meta device (no memory) with bitsandbytes `Linear4bit` in place of every decoder
projection; LoRA adapters can be added at that point too. Then, layer by layer, the layer's tensors are read from the
safetensors files, quantized straight onto the target device, and handed to `on_layer` (FSDP shards the layer
there, so a rank never holds more than its shard plus one whole layer). Host RAM holds about one full-precision
tensor at a time whatever the model size, instead of the whole model, and on a GPU the 4-bit model never has to fit
one card.

    model = build_4bit_model_on_meta(model_dir, torch.bfloat16, storage_dtype=torch.bfloat16)
    model = add_lora(model, ...)               # optional: adapters are created on meta and initialized per layer
    load_4bit_weights(model, model_dir, torch.device("cuda", 0), on_layer=fully_shard)
"""
import contextlib
import ctypes
import json
from pathlib import Path

import torch

from common.config import UserError
from common.layer_split import meta_model
from common.model import bnb_quantization_config, disable_bnb_cpu_inference_repack


def release_freed_host_memory() -> None:
    """Give freed heap memory back to the OS (glibc keeps it otherwise, and the next layer's temporaries land in
    fresh pages); a no-op where malloc_trim does not exist."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def checkpoint_tensor_files(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (sharded checkpoints have an index, single ones do not)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        return {name: model_dir / file for name, file in json.loads(index.read_text())["weight_map"].items()}
    single = model_dir / "model.safetensors"
    if not single.is_file():
        raise UserError(f"{model_dir}: no model.safetensors or model.safetensors.index.json; low-memory 4-bit "
                        "loading reads safetensors only (convert .bin checkpoints with save_pretrained)")
    from safetensors import safe_open

    with safe_open(single, framework="pt") as f:
        names = f.keys()  # a safe_open handle is not iterable itself
        return dict.fromkeys(names, single)


def build_4bit_model_on_meta(model_dir: Path, compute_dtype: torch.dtype, storage_dtype: torch.dtype = torch.uint8,
                             model_class=None, attn_implementation: str = "sdpa", **config_kwargs):
    """The checkpoint's architecture on the meta device with its linear layers NF4 Linear4bit, as from_pretrained
    builds it before loading (common.model.meta_model with the recipes' QLoRA settings: double quant, blocks of 64;
    the head stays as it is). storage_dtype is the dtype the packed 4-bit bytes are stored as: FSDP shards a
    parameter as its dtype, so it must equal FSDP's param dtype (the compute dtype)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False, **config_kwargs)
    model, _ = meta_model(config, compute_dtype, bnb_quantization_config("nf4", compute_dtype, storage_dtype),
                          model_class, attn_implementation)
    # no CPU inference repack: it rewrites the weights at the first no-grad forward (an eval), and training after it
    # is wrong, under FSDP for good
    disable_bnb_cpu_inference_repack(model)
    model.is_loaded_in_4bit = True  # what peft reads to wrap Linear4bit with its 4-bit LoRA layer
    return model


def decoder_layers(model) -> torch.nn.ModuleList:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # under peft
    return inner.model.layers


def load_4bit_weights(model, model_dir: Path, device: torch.device, on_layer=None, seed: int = 0) -> None:
    """Fill a model from build_4bit_model_on_meta (perhaps wrapped by peft since) with the checkpoint's weights:
    the embeddings, then each decoder layer in turn (quantized onto `device`, its LoRA adapters initialized there,
    then `on_layer(layer)`), then the final norm and head. Adapters are initialized from seed + layer index, so every
    rank of a multi-process run builds the same ones. Tensors the checkpoint lacks (a new classifier head) are
    initialized the model's own way; a missing decoder weight is an error."""
    import bitsandbytes as bnb

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    files = checkpoint_tensor_files(model_dir)
    layers = decoder_layers(model)
    handles = {}

    def read(name: str) -> torch.Tensor:
        from safetensors import safe_open

        if name not in files:
            raise UserError(f"{model_dir}: the checkpoint has no tensor {name}; does config.json match the weights?")
        if files[name] not in handles:
            handles[files[name]] = safe_open(files[name], framework="pt")
        return handles[files[name]].get_tensor(name)

    def fill(module: torch.nn.Module, prefix: str) -> None:
        """Every parameter and persistent buffer of `module` (named `prefix` in the checkpoint) onto device."""
        for name, sub in module.named_modules():
            key = prefix + (name + "." if name else "")
            for pname, param in list(sub.named_parameters(recurse=False)):
                if param.device.type != "meta":
                    continue
                if "lora_" in name:  # a peft adapter: initialized below, not read
                    continue
                ckpt_name = (key + pname).replace("base_layer.", "")
                if isinstance(sub, bnb.nn.Linear4bit) and pname == "weight":
                    full = read(ckpt_name).to(sub.compute_dtype)
                    sub.weight = bnb.nn.Params4bit(  # the settings the meta model was built with
                        full, requires_grad=False, blocksize=param.blocksize, quant_type=param.quant_type,
                        compress_statistics=param.compress_statistics, quant_storage=sub.quant_storage,
                        module=sub).to(device)
                    del full
                    release_freed_host_memory()  # the full-precision copy, before the next one is read
                elif ckpt_name in files:
                    value = read(ckpt_name).to(device=device, dtype=param.dtype)
                    sub._parameters[pname] = torch.nn.Parameter(value, requires_grad=param.requires_grad)
                else:
                    missing.append(ckpt_name)
        for sub in module.modules():  # peft adapters: materialize and initialize on device
            if hasattr(sub, "reset_lora_parameters") and any(p.device.type == "meta" for p in sub.parameters()):
                for adapter in sub.active_adapters:
                    for holder in (sub.lora_A, sub.lora_B):
                        holder[adapter].to_empty(device=device)
                    sub.reset_lora_parameters(adapter, init_lora_weights=True)

    missing: list[str] = []
    fill(inner.get_input_embeddings(), "model.embed_tokens.")
    for i, layer in enumerate(layers):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + i)
            fill(layer, f"model.layers.{i}.")
        if missing:
            raise UserError(f"{model_dir}: layer {i} lacks {', '.join(missing)}; not a Llama-family checkpoint?")
        release_freed_host_memory()
        if on_layer is not None:
            on_layer(layer)
    fill(inner.model.norm, "model.norm.")
    if inner.config.tie_word_embeddings and inner.get_output_embeddings() is not None:
        inner.get_output_embeddings().weight = inner.get_input_embeddings().weight
    head = inner.get_output_embeddings() or getattr(inner, "score", None)
    head_prefix = "lm_head." if inner.get_output_embeddings() is not None else "score."
    if head is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + len(layers))
            fill(head, head_prefix)
            for name in missing:  # a classifier head the causal-LM checkpoint lacks: initialized the model's way
                module = inner.get_submodule(name.rpartition(".")[0]) if "." in name else inner
                module.to_empty(device=device)
                inner._init_weights(module)
            missing.clear()
    for name, param in model.named_parameters():
        if param.device.type == "meta":
            raise UserError(f"{model_dir}: the checkpoint has no tensor for {name}")
    rotary = inner.model.rotary_emb  # its inv_freq buffer is computed at construction: rebuild it on the device
    with torch.device(device):
        inner.model.rotary_emb = type(rotary)(inner.config)
    release_freed_host_memory()
