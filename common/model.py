"""Finding, loading and quantizing Llama-family models; the pad token; LoRA.

`model_path="tiny"` is a deterministic random-init Llama built from common/tiny_llama/config.json, saved once to a
cache folder with its tokenizer, then loaded by `from_pretrained` like any other checkpoint. Any other model_path is
a local Hugging Face folder: nothing is fetched from a hub and `trust_remote_code` stays off.
"""
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from common.config import UserError
from common.layer_split import fitting_layer_split

TINY_LLAMA_DIR = Path(__file__).resolve().parent / "tiny_llama"
TINY_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "chat_template.jinja")
QUANTIZATIONS = ("none", "nf4", "int8")


def cache_dir() -> Path:
    return Path(os.environ.get("LLAMA_RECIPES_CACHE", Path.home() / ".cache" / "llama-train-recipes"))


def materialize_tiny_llama() -> Path:
    """Build the tiny Llama once (fixed seed) and return its folder; safe when several ranks race to build it."""
    digest = hashlib.sha256(torch.__version__.encode())
    for name in TINY_FILES:
        digest.update((TINY_LLAMA_DIR / name).read_bytes())
    target = cache_dir() / f"tiny-llama-{digest.hexdigest()[:12]}"
    if (target / "model.safetensors").is_file():
        return target
    from transformers import LlamaConfig, LlamaForCausalLM

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    config = LlamaConfig.from_pretrained(TINY_LLAMA_DIR)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    model.save_pretrained(tmp)
    for name in TINY_FILES[1:]:
        shutil.copy(TINY_LLAMA_DIR / name, tmp / name)
    try:
        os.rename(tmp, target)  # atomic: a reader sees no folder or a complete one
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(model_path: str, option: str = "model_path") -> Path:
    """'tiny' or a local Hugging Face model folder; a clear error for anything else, naming `--{option}` (the option
    the value came in by: model_path in the recipes, init_from in pretraining, model or base in the tools)."""
    if model_path == "tiny":
        return materialize_tiny_llama()
    given = f"--{option}={model_path}"
    path = Path(model_path).expanduser()
    if not path.is_dir():
        raise UserError(f"{given}: no such folder; expected 'tiny' or a local Hugging Face "
                        "model folder (config.json + *.safetensors); nothing is downloaded")
    if not (path / "config.json").is_file():
        raise UserError(f"{given}: no config.json in this folder; not a Hugging Face checkpoint")
    config = json.loads((path / "config.json").read_text())
    arch = " ".join(config.get("architectures") or [])
    if "quantization_config" not in config and not any(s in arch for s in ("CausalLM", "SequenceClassification")):
        raise UserError(f"{given}: config.json names architectures [{arch}]; expected a causal "
                        "LM checkpoint (e.g. LlamaForCausalLM)")
    return path


def ensure_pad_token(tokenizer) -> str:
    """Give the tokenizer a pad token and left padding; returns where the pad token came from.

    Pads never carry loss whatever their id (labels are -100 on pad positions by construction), but a pad distinct
    from EOS keeps EOS meaningful for reward models and generation, so prefer one when the vocabulary has it.
    """
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is not None:
        return "tokenizer"
    vocab = tokenizer.get_vocab()
    for candidate in ("<|finetune_right_pad_id|>", "<pad>", "<|reserved_special_token_0|>", "<|endoftext|>"):
        if candidate in vocab and candidate != tokenizer.eos_token:
            tokenizer.pad_token = candidate
            return candidate
    if tokenizer.unk_token is not None and tokenizer.unk_token != tokenizer.eos_token:
        tokenizer.pad_token = tokenizer.unk_token
        return "unk"
    tokenizer.pad_token = tokenizer.eos_token
    return "eos (no other token available)"


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False)
    ensure_pad_token(tokenizer)
    return tokenizer


def bnb_quantization_config(quantization: str, compute_dtype: torch.dtype, storage_dtype: torch.dtype = torch.uint8):
    """BitsAndBytesConfig for 'nf4' (4-bit NormalFloat, double quant: QLoRA) or 'int8'; None for 'none'.
    storage_dtype: the dtype the packed 4-bit bytes are stored as (FSDP needs its own param dtype there)."""
    if quantization not in QUANTIZATIONS:
        raise UserError(f"--quantization={quantization}: expected one of {', '.join(QUANTIZATIONS)}")
    if quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if quantization == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_quant_storage=storage_dtype)
    return BitsAndBytesConfig(load_in_8bit=True)


def disable_bnb_cpu_inference_repack(model) -> int:
    """On CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights into an inference-only layout at the first
    no-grad forward; training after that (say, after an eval) gets wrong LoRA gradients with only a warning.
    Turn the repack off on every 4-bit layer; returns how many layers were changed."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for m in layers:
        m.support_avx512bf16_for_cpu = False
    return len(layers)


def load_model(model_dir: Path, quantization="none", dtype=torch.float32, device_map=None, model_class=None,
               attn_implementation="sdpa", max_memory=None, **kwargs):
    """from_pretrained on a local folder, optionally quantized with bitsandbytes; kwargs go to from_pretrained
    (num_labels for a classifier, for example). device_map and max_memory as `layer_split_device_map` returns them:
    'auto' is planned over the GPUs here first (`fitting_layer_split`), so a model that does not fit fails in seconds,
    before any weight is read, and from_pretrained loads exactly the plan that was checked."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_class = model_class or AutoModelForCausalLM
    if device_map == "auto":
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False, **kwargs)
        device_map = fitting_layer_split(config, max_memory, dtype, bnb_quantization_config(quantization, dtype),
                                         model_class)
    model = model_class.from_pretrained(
        model_dir, dtype=dtype, device_map=device_map, attn_implementation=attn_implementation,
        quantization_config=bnb_quantization_config(quantization, dtype), local_files_only=True,
        trust_remote_code=False, **kwargs,
    )
    if quantization == "nf4":
        disable_bnb_cpu_inference_repack(model)
    return model


# ---------------------------------------------------------------------------------------------------------------
# Layer split ("naive pipeline"): one process, the decoder layers spread over the visible GPUs, one GPU computing at a
# time. It is for fitting a model too big for one card (65B in 4-bit on 2 x 24 GB), not for speed.

def add_lora(model, r: int, alpha: int, dropout: float, target_modules, task_type="CAUSAL_LM", modules_to_save=None):
    """Wrap `model` with LoRA adapters; target_modules 'all-linear' puts them on every projection but the head."""
    from peft import LoraConfig, get_peft_model

    targets = "all-linear" if target_modules in ("all-linear", ["all-linear"]) else list(target_modules)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type=task_type,
                        bias="none", modules_to_save=modules_to_save)
    return get_peft_model(model, config)


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total), counting a 4-bit packed weight as the parameters it stands for."""
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()
    total = trainable = 0
    for p in model.parameters():
        n = p.numel() * (2 if p.__class__.__name__ == "Params4bit" else 1)
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def resolve_liger(setting: str, device: torch.device) -> bool:
    """Whether a run patches Liger's kernels in (--liger): 'auto' where they run (a GPU and liger-kernel installed),
    'on' always (a UserError without them, before anything is written), 'off' never."""
    import importlib.util

    if setting not in ("auto", "on", "off"):
        raise UserError(f"--liger must be auto, on or off, got {setting!r}")
    installed = importlib.util.find_spec("liger_kernel") is not None
    usable = installed and device.type == "cuda"
    if setting == "on" and not usable:
        missing = "a GPU" if installed else "liger-kernel (pip install liger-kernel)"
        raise UserError(f"--liger=on needs {missing}; --liger=auto uses it only where it runs")
    return usable and setting != "off"


def apply_liger_kernels(model) -> str:
    """Liger's Triton kernels for RMSNorm, RoPE and SwiGLU patched into a loaded Llama-family model (before LoRA is
    added: Liger finds the layers on the bare model); the loss stays the recipes' own (common.losses, chunked with
    --loss_chunk). Returns what the start-up log says."""
    from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)
    return "liger on (RMSNorm, RoPE, SwiGLU)"


def compile_decoder_layers(model) -> int:
    """torch.compile every decoder layer in place (nn.Module.compile: the parameter names, state dicts and saved
    adapters stay as they were); returns how many. Call it after the adapters are added, so the compiled layers
    include them. The layers are compiled for dynamic shapes from the start: the first batch pays the compile (about
    a minute on CPU) and every later length reuses it. torch's default (static shapes first) recompiled at every new
    batch length here and ran at 0.02-0.18x of eager on CPU (bench/compile_layers.py)."""
    stacks = [m for name, m in model.named_modules() if name.endswith("layers") and isinstance(m, torch.nn.ModuleList)]
    if not stacks:
        raise ValueError(f"compile_decoder_layers: {type(model).__name__} has no ModuleList named *layers")
    for layer in stacks[0]:
        layer.compile(dynamic=True)
    return len(stacks[0])


def prepare_for_lora_training(model, quantized: bool, gradient_checkpointing: bool):
    """Before adding LoRA: freeze the base, keep norms and head in fp32 for a k-bit base (peft's recipe), and turn on
    non-reentrant gradient checkpointing with input grads so checkpointed segments still reach the adapters."""
    if quantized:
        from peft import prepare_model_for_kbit_training

        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                               gradient_checkpointing_kwargs={"use_reentrant": False})
    for p in model.parameters():
        p.requires_grad_(False)
    if gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model


def pool_hidden(hidden: torch.Tensor, attention_mask: torch.Tensor, how: str) -> torch.Tensor:
    """One vector per row of a LEFT-padded batch: 'last' takes the final column (the last real token of every row,
    whatever the pad id, so pad == EOS cannot move it), 'mean' averages the real tokens. The mask may be on another
    device than hidden (the first GPU of a layer split, while hidden comes from the last)."""
    if how == "last":
        return hidden[:, -1]
    if how == "mean":
        mask = attention_mask.to(hidden.device).unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
    raise ValueError(f"pooling must be 'last' or 'mean', got {how!r}")


class PooledClassifier(torch.nn.Module):
    """A sequence classifier / reward model read at one vector per row: the backbone's last hidden states, pooled
    with `pool_hidden`, through the model's `score` head. Wrapping the whole computation in one module keeps DDP
    and DeepSpeed engines (which hook a module's forward) in charge of it."""

    def __init__(self, model, pooling: str):
        super().__init__()
        self.model, self.pooling = model, pooling
        pool_hidden(torch.zeros(1, 1, 1), torch.ones(1, 1), pooling)  # reject a bad pooling name now, not mid-run

    def forward(self, input_ids, attention_mask, position_ids):
        inner = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model  # under peft
        hidden = inner.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                  use_cache=False).last_hidden_state  # no KV cache: nothing will be generated
        return inner.score(pool_hidden(hidden, attention_mask, self.pooling))


def grow_vocabulary(model, vocab_size: int, gather=None) -> int:
    """Give the input embeddings and the LM head vocab_size rows when a tokenizer grew (say, after
    data_scripts/merge_tokenizer.py); the new rows start at the mean of the old ones, so new tokens begin as an
    "average" token instead of noise. `gather`: a context manager giving the full weights (ZeRO-3). Returns the
    number of rows added."""
    import contextlib

    embeddings = model.get_input_embeddings().weight
    # under ZeRO-3 a partitioned weight's own shape is (0,); ds_shape is the whole one
    old = getattr(embeddings, "ds_shape", embeddings.shape)[0]
    if vocab_size <= old:
        return 0
    model.resize_token_embeddings(vocab_size, mean_resizing=False)
    weights = [model.get_input_embeddings().weight]
    if model.get_output_embeddings() is not None and not model.config.tie_word_embeddings:
        weights.append(model.get_output_embeddings().weight)
    with (gather(weights) if gather else contextlib.nullcontext()), torch.no_grad():
        for w in weights:
            w[old:] = w[:old].mean(0)
    return vocab_size - old


# Bundled architectures for pretraining from scratch: the tiny test Llama and common/model_configs/*.json
MODEL_CONFIGS = {"tiny": TINY_LLAMA_DIR / "config.json",
                 **{n: TINY_LLAMA_DIR.parent / "model_configs" / f"{n}.json" for n in ("1b", "7b", "65b")}}


def pretrain_tokenizer_dir(tokenizer_path: str, init_from: str) -> Path:
    """'tiny' (the tiny Llama's), a tokenizer folder, or '' for init_from's own tokenizer."""
    if tokenizer_path == "tiny" or not (tokenizer_path or init_from):
        return TINY_LLAMA_DIR
    path = Path(tokenizer_path) if tokenizer_path else resolve_model_path(init_from, option="init_from")
    if not path.is_dir():
        raise UserError(f"--tokenizer_path={tokenizer_path}: no such folder; expected 'tiny' or a tokenizer folder "
                        "(data_scripts/train_tokenizer.py or merge_tokenizer.py make one)")
    return path


def pretrain_model_config(model_config: str, init_from: str, tokenizer):
    """The architecture to pretrain: init_from's (its vocabulary grown to the tokenizer's if that is larger), or a
    bundled name / config.json with the tokenizer's vocabulary (rounded up to a multiple of 64 rows)."""
    from transformers import AutoConfig

    if init_from:
        config = AutoConfig.from_pretrained(resolve_model_path(init_from, option="init_from"), local_files_only=True,
                                            trust_remote_code=False)
        config.vocab_size = max(config.vocab_size, len(tokenizer))  # what grow_vocabulary makes of it
    else:
        path = MODEL_CONFIGS.get(model_config, Path(model_config))
        if not path.is_file():
            raise UserError(f"--model_config={model_config}: expected {', '.join(MODEL_CONFIGS)} or a config.json")
        config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        config.vocab_size = -(-len(tokenizer) // 64) * 64
        config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    return config


def resolve_attention(requested: str, device: torch.device) -> str:
    """'auto': flash-attention 2 when it is installed and the GPU is of compute capability >= 8.0 (its kernels need
    Ampere or later: a V100 or T4 with flash_attn installed fails at the first forward), else sdpa; anything else as
    asked."""
    if requested != "auto":
        return requested
    import importlib.util

    from common.runtime import has_native_bf16

    return "flash_attention_2" if has_native_bf16(device) and importlib.util.find_spec("flash_attn") else "sdpa"


def read_safetensors_subset(model_dir: Path, names: list[str]) -> dict:
    """Only the named tensors of a Hugging Face checkpoint (model.safetensors, or the shards that
    model.safetensors.index.json points to), read one at a time from the memory-mapped files: a pipeline stage holds
    its own layers in host RAM, never the whole model."""
    from safetensors import safe_open

    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
    elif (model_dir / "model.safetensors").is_file():
        weight_map = dict.fromkeys(names, "model.safetensors")
    else:
        raise UserError(f"{model_dir}: no model.safetensors or model.safetensors.index.json (a pipeline stage reads "
                        "only its own layers from safetensors files; convert .bin weights with save_pretrained)")
    missing = [name for name in names if name not in weight_map]
    if missing:
        raise UserError(f"{index}: no tensor {missing[0]} ({len(missing)} missing): not this model's checkpoint")
    state = {}
    by_file = {}
    for name in names:
        by_file.setdefault(weight_map[name], []).append(name)
    for file_name, file_names in by_file.items():
        with safe_open(str(model_dir / file_name), framework="pt") as f:
            present = set(f.keys())
            for name in file_names:
                if name not in present:
                    raise UserError(f"{model_dir / file_name}: no tensor {name}: not this model's checkpoint")
                state[name] = f.get_tensor(name)
    return state
