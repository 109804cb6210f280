"""GPTQ int4 bases through gptqmodel (the maintained successor of auto-gptq, and what transformers uses for GPTQ):
quantizing a local checkpoint, the tiny GPTQ Llama of the default runs and tests, and loading a GPTQ checkpoint with a
kernel that LoRA can train through.

    quantize_gptq(model_dir, out_dir, bits=4, group_size=128, desc_act=False, calibration_texts=texts, seq_len=512)
    model = load_gptq_model(model_dir)                                 # a causal LM, ready for add_lora
    model = load_gptq_model(model_dir, AutoModelForSequenceClassification, num_labels=3)

Quantizing goes through transformers' `GPTQConfig(dataset=...)` (optimum + gptqmodel) and is saved in the GPTQ v1
format, the one GPTQ loaders in general read (v2 is gptqmodel's own). Importing gptqmodel changes the whole process
(HF_HOME, the root logger, a banner); `import_gptqmodel` undoes that, so always import it through there.
"""
import contextlib
import hashlib
import io
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from common.checkpoint import atomic_write_dir
from common.config import UserError
from common.layer_split import fitting_layer_split
from common.model import cache_dir, materialize_tiny_llama, resolve_model_path

REPO = Path(__file__).resolve().parents[1]
QUANTIZE_SCRIPT = REPO / "data_scripts" / "quantize_gptq.py"
SAMPLE_CALIBRATION = REPO / "data" / "sft" / "train.jsonl"
GPTQ_BITS = (2, 3, 4, 8)
# The tiny GPTQ Llama: 16 windows of 64 tokens of the bundled SFT data (int4 loss within 0.01 of full precision).
TINY_GPTQ_SETTINGS = {"bits": 4, "group_size": 128, "desc_act": False, "n_samples": 16, "seq_len": 64}
TINY_GPTQ_FORMAT = "1"  # bump when quantize_gptq changes what it writes, so cached tiny models are rebuilt
HF_CACHE_VARIABLES = ("HF_HOME", "HF_HUB_CACHE", "TRANSFORMERS_CACHE", "HF_MODULES_CACHE")


def import_gptqmodel():
    """Import gptqmodel without its side effects on the rest of the process; returns the module."""
    if (os.cpu_count() or 1) <= 2:
        # gptqmodel sizes its CPU pool at (cores + 1) // 2 workers but asks for 2 when loading a checkpoint to
        # quantize: on 2 cores that fails with "Virtual pool 'model_loader:cpu' requests 2 workers"
        os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    import transformers  # noqa: F401  (huggingface_hub reads HF_HOME at import: let it see the user's value)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # gptqmodel's progress-bar library prints a bare empty line at import
        from logbar import LogBar
    kept = printed.getvalue().strip()
    if kept:  # anything else it prints is passed on
        print(kept, flush=True)

    hf_cache_before = {name: os.environ.get(name) for name in HF_CACHE_VARIABLES}
    root = logging.getLogger()
    root_level, root_handlers = root.level, list(root.handlers)
    LogBar.shared().setLevel(logging.ERROR)  # gptqmodel's logger: no start-up banner, no per-layer INFO lines
    for name in ("torchao", "torch.utils._pytree"):  # torchao, a gptqmodel dependency, warns at import on CPU
        logging.getLogger(name).setLevel(logging.ERROR)
    import gptqmodel

    # its tokenizer helper points HF_HOME and friends at /tmp/tokenicer_hf_home and turns the root logger to INFO
    for name, value in hf_cache_before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    root.setLevel(root_level)
    for handler in list(root.handlers):
        if handler not in root_handlers:
            root.removeHandler(handler)
    logging.getLogger("optimum").setLevel(logging.WARNING)  # one INFO line per quantized layer otherwise
    return gptqmodel


# ---------------------------------------------------------------------------------------------------------------
# Calibration data


def record_texts(records) -> list[str]:
    """The calibration text of each record: its string fields joined by newlines (chat records: every message)."""
    texts = []
    for record in records:
        parts = []
        for value in record.data.values():
            if isinstance(value, str):
                parts.append(value)
            elif isinstance(value, list):  # chat: [{"role": ..., "content": ...}, ...]
                parts += [m["content"] for m in value if isinstance(m, dict) and isinstance(m.get("content"), str)]
        text = "\n".join(p for p in parts if p.strip())
        if text:
            texts.append(text)
    return texts


def calibration_samples(texts: list[str], tokenizer, n_samples: int, seq_len: int) -> list[dict]:
    """Join the texts end to end (EOS between them) and cut the token stream into up to n_samples windows of seq_len
    tokens, each starting with BOS: the usual GPTQ calibration set. The last window may be shorter."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    body = seq_len - len(bos)
    stream: list[int] = []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False).input_ids + eos
        if len(stream) >= n_samples * body:
            break
    windows = [stream[i:i + body] for i in range(0, len(stream), body)][:n_samples]
    return [{"input_ids": [bos + w], "attention_mask": [[1] * (len(bos) + len(w))]} for w in windows]


# ---------------------------------------------------------------------------------------------------------------
# Quantizing


def linear_input_sizes(config) -> dict[str, int]:
    """Input features of each quantized projection of a Llama-family block, read from its config."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return {"q_proj/k_proj/v_proj": config.hidden_size, "o_proj": config.num_attention_heads * head_dim,
            "gate_proj/up_proj": config.hidden_size, "down_proj": config.intermediate_size}


def check_group_size(config, group_size: int):
    """GPTQ quantizes each row in groups of group_size input columns: every layer's input size must divide evenly."""
    if group_size == -1:
        return
    if group_size <= 0:
        raise UserError(f"--group_size={group_size}: expected a positive group size, or -1 for one group per row")
    sizes = linear_input_sizes(config)
    for layer, size in sizes.items():
        if size % group_size:
            common = math.gcd(*sizes.values())
            fits = [g for g in (128, 64, 32, 16) if common % g == 0]
            hint = f"--group_size={fits[0]}" if fits else "--group_size=-1"
            raise UserError(f"--group_size={group_size}: the input size of {layer} is {size}, not a multiple of "
                            f"{group_size}; every layer's input size must be: use {hint}")


def save_gptq_checkpoint(model, folder: Path):
    """save_pretrained a model quantized through GPTQConfig, in GPTQ v1 format and without the calibration data."""
    quantizer = model.hf_quantizer.optimum_quantizer
    quantizer.dataset = None
    model.config.quantization_config.dataset = None  # calibration token ids do not belong in config.json
    model.config.quantization_config.tokenizer = None
    # gptqmodel keeps zero points in its own v2 layout in memory; optimum's save converts them to v1, the format
    # vLLM, TGI and older GPTQ loaders read, and config.json has to say so
    model.config.quantization_config.format = "gptq"
    quantizer.save(model, str(folder))


@dataclass(frozen=True)
class QuantizePlacement:
    dtype: torch.dtype  # what the full-precision checkpoint is loaded in
    device_map: dict  # where it is loaded: always host RAM
    compute: str  # where GPTQ runs on each block, for the log


def quantize_placement(cuda_available: bool) -> QuantizePlacement:
    """Where quantize_gptq loads the full-precision model and where GPTQ computes. The model always loads into host
    RAM: optimum's GPTQ loop (optimum.gptq.GPTQQuantizer.quantize_model) moves one decoder block at a time to GPU 0
    when a GPU is there, quantizes it with the calibration activations, and moves it back, so GPU memory holds one
    block (65B: about 1.6 GB in fp16) plus the activations, and host RAM the whole fp16 model (65B: about 130 GB).
    fp16 with a GPU (what the GPU computes in), fp32 on CPU (fp16 matmuls are slow or missing there)."""
    if cuda_available:
        return QuantizePlacement(torch.float16, {"": "cpu"}, "GPU 0, one block at a time")
    return QuantizePlacement(torch.float32, {"": "cpu"}, "CPU")


def quantize_gptq(model_dir, out_dir, bits: int = 4, group_size: int = 128, desc_act: bool = False,
                  calibration_texts=(), seq_len: int = 512, n_samples: int = 128) -> dict:
    """Quantize the Hugging Face Llama-family model in model_dir to GPTQ and write it, with its tokenizer, to out_dir
    (atomically). The model is loaded into host RAM and quantized block by block (see quantize_placement). Returns
    out_dir, the samples and tokens of calibration, where GPTQ computed and the seconds quantizing took."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GPTQConfig

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if bits not in GPTQ_BITS:
        raise UserError(f"--bits={bits}: GPTQ quantizes to {', '.join(map(str, GPTQ_BITS))} bits")
    if seq_len < 2 or n_samples < 1:
        raise UserError(f"--seq_len={seq_len}, --n_samples={n_samples}: expected seq_len >= 2 and n_samples >= 1")
    if not (model_dir / "config.json").is_file():
        raise UserError(f"{model_dir}: no config.json here; expected a local Hugging Face model folder")
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False)
    if getattr(config, "quantization_config", None):
        method = dict(config.quantization_config).get("quant_method", "?")
        raise UserError(f"{model_dir}: already quantized ({method}); GPTQ needs the full-precision checkpoint")
    check_group_size(config, group_size)
    texts = [t for t in calibration_texts if t.strip()]
    if not texts:
        raise UserError("no calibration text: the calibration file has no records with string fields")
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False)
    samples = calibration_samples(texts, tokenizer, n_samples, seq_len)

    import_gptqmodel()
    placement = quantize_placement(torch.cuda.is_available())
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=placement.dtype, device_map=placement.device_map,
        quantization_config=GPTQConfig(bits=bits, group_size=group_size, desc_act=desc_act, dataset=samples,
                                       model_seqlen=seq_len),
        local_files_only=True, trust_remote_code=False)
    seconds = time.perf_counter() - start
    atomic_write_dir(out_dir, lambda folder: (save_gptq_checkpoint(model, folder), tokenizer.save_pretrained(folder)))
    return {"out_dir": out_dir, "samples": len(samples), "seconds": seconds, "compute": placement.compute,
            "tokens": sum(len(s["input_ids"][0]) for s in samples)}


@contextlib.contextmanager
def torch_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def materialize_tiny_gptq() -> Path:
    """Quantize the tiny Llama to GPTQ int4 once (on the bundled SFT data) and return its folder; the cache key
    changes with the tiny model, the settings, the calibration data and the gptqmodel version."""
    from importlib.metadata import version

    from common.data import read_records

    tiny = materialize_tiny_llama()
    digest = hashlib.sha256(json.dumps([tiny.name, TINY_GPTQ_SETTINGS, TINY_GPTQ_FORMAT, version("gptqmodel"),
                                        version("optimum")], sort_keys=True).encode())
    digest.update(SAMPLE_CALIBRATION.read_bytes())
    target = cache_dir() / f"tiny-llama-gptq-{digest.hexdigest()[:12]}"
    if (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        # one thread: the tiny model's matrices are too small to gain from more, and on a busy machine spinning
        # threads made this 20x slower (85 s against 4 s). optimum's per-block progress bars (stderr) are held back:
        # a default run's screen starts with its start-up block; they are shown only if quantizing fails
        bars = io.StringIO()
        try:
            with torch_threads(1), contextlib.redirect_stderr(bars):
                quantize_gptq(tiny, tmp / "model", calibration_texts=record_texts(read_records(SAMPLE_CALIBRATION)),
                              **TINY_GPTQ_SETTINGS)
        except Exception:
            print(bars.getvalue(), file=sys.stderr, flush=True)
            raise
        os.rename(tmp / "model", target)  # atomic: a reader sees no folder or a complete one
    except OSError:
        if not (target / "model.safetensors").is_file():  # not another process finishing first: a real failure
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# ---------------------------------------------------------------------------------------------------------------
# Loading for training


def gptq_quantization_config(model_dir: Path) -> dict | None:
    """The GPTQ quantization_config of a checkpoint's config.json, or None when it has none."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    quant = config.get("quantization_config") or {}
    return quant if quant.get("quant_method") == "gptq" else None


def resolve_gptq_model_path(model_path: str) -> Path:
    """'tiny' (the cached tiny GPTQ Llama) or a local GPTQ checkpoint; a folder that is not GPTQ is an error that
    gives the command quantizing it."""
    if model_path == "tiny":
        return materialize_tiny_gptq()
    path = resolve_model_path(model_path)
    if gptq_quantization_config(path) is None:
        quantized = f"{str(path).rstrip('/')}-gptq-int4"
        raise UserError(f"--model_path={model_path}: not a GPTQ checkpoint (config.json has no GPTQ "
                        f"quantization_config); quantize it first: python {QUANTIZE_SCRIPT} --model_path={path} "
                        f"--out_dir={quantized}   then train with --model_path={quantized}")
    return path


def keep_gptq_kernels_trainable(model) -> int:
    """On CPU the trainable GPTQ kernel (TorchAtenLinear) repacks its weights for an inference-only int4 matmul at the
    first no-grad forward in eval mode; training afterwards (say, after an eval) gets no gradient through the base
    layers, and LoRA gradients come out wrong with no warning. Pin every such layer to its differentiable path;
    returns how many layers were pinned."""
    from gptqmodel.nn_modules.qlinear.torch_aten_kernel import TorchAtenLinear

    layers = [m for m in model.modules() if isinstance(m, TorchAtenLinear)]
    for layer in layers:
        layer.linear_mode = "train"
    return len(layers)


def load_gptq_model(model_dir, model_class=None, dtype=torch.float32, device_map=None, backend="auto_trainable",
                    attn_implementation="sdpa", max_memory=None, **config_overrides):
    """from_pretrained on a local GPTQ checkpoint with a kernel that backpropagates (`auto_trainable`, or `torch`);
    config_overrides go to the config (num_labels for a classifier, for example). device_map and max_memory as
    common.model.layer_split_device_map returns them: 'auto' is planned and checked before any weight is read."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_dir = Path(model_dir)
    if gptq_quantization_config(model_dir) is None:
        raise UserError(f"{model_dir}: not a GPTQ checkpoint (config.json has no GPTQ quantization_config)")
    import_gptqmodel()
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False, **config_overrides)
    # the kernel is chosen at load time from quantization_config.backend; the default one on CPU cannot train
    config.quantization_config = {**dict(config.quantization_config), "backend": backend}
    model_class = model_class or AutoModelForCausalLM
    if device_map == "auto":
        device_map = fitting_layer_split(config, max_memory, dtype, model_class=model_class)
    model = model_class.from_pretrained(
        model_dir, config=config, dtype=dtype, device_map=device_map, attn_implementation=attn_implementation,
        local_files_only=True, trust_remote_code=False)
    keep_gptq_kernels_trainable(model)
    return model


def gptq_linear_names(model) -> list[str]:
    """Names (last component) of the GPTQ-quantized projections, e.g. ['down_proj', ..., 'v_proj']: what LoRA's
    'all-linear' means on a GPTQ base (peft's own 'all-linear' only finds torch.nn.Linear layers)."""
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, BaseQuantLinear)})


def count_gptq_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameters, counting each quantized projection as the in x out weights it stands for (its
    packed int4 tensors are buffers, not parameters)."""
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    total += sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, BaseQuantLinear))
    return trainable, total
