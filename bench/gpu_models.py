"""Random-init models and data for bench/gpu_smoke.sh, made on the machine that measures (nothing is downloaded):

    python bench/gpu_models.py make-1b OUT_DIR              # Llama-3.2-1B shape, random, bf16, made on the GPU, saved
    python bench/gpu_models.py long-sft OUT.jsonl --seq_len=2048 --examples=256   # SFT records of up to 2,048 tokens
    python bench/gpu_models.py qlora --shape=llama3-8b --seq_len=2048 --steps=4 --checkpointing=true,false

`qlora` measures QLoRA training of a model too big to keep as a file here: built on the meta device, each decoder
projection becomes an NF4 (double quant) Linear4bit quantized on the device from random bf16 weights one layer at
a time (host RAM stays small, no 16 GB checkpoint is written), embeddings, norms and head made on the device. Then
what sft/qlora does: prepare_for_lora_training (norms and head fp32, gradient checkpointing), add_lora (r=64, alpha
16, dropout 0.05, every projection), paged 8-bit AdamW (torch AdamW where bitsandbytes has no 8-bit optimizer: CPU),
bf16 autocast, token_loss_sum; batch 1, random token ids. For each --checkpointing value in turn (peak statistics
reset in between; the optimizer states of the first stay allocated) it prints one line
`RESULT {"checkpointing": ..., "tok_s": ..., "peak_alloc_gb": ..., "peak_reserved_gb": ..., "estimate_gb": ...}`:
tok/s is the median over the steps after the first, estimate_gb tools/estimate_memory.py's figure for the same run.
"""
import argparse
import contextlib
import json
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # a standalone script: make `common` and `tools` importable

import torch  # noqa: E402

from common.config import parse_bool  # noqa: E402
from common.model import TINY_FILES, TINY_LLAMA_DIR  # noqa: E402

CONFIGS = REPO / "common" / "model_configs"
# Llama 3 8B's shape (no file in common/model_configs: the 8B is only ever built on the meta device here)
LLAMA3_8B = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096, intermediate_size=14336,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                 max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)
SHAPES = {"llama3-8b": LLAMA3_8B, "llama3.2-1b": CONFIGS / "llama3.2-1b.json", "65b": CONFIGS / "65b.json",
          "tiny": TINY_LLAMA_DIR / "config.json"}
LORA_R, LORA_ALPHA, LORA_DROPOUT = 64, 16, 0.05  # sft/qlora's defaults


def llama_config(shape: str | dict):
    """A LlamaConfig from a SHAPES name, a config.json path or a dict of its fields; the tiny tokenizer's ids."""
    from transformers import LlamaConfig

    source = SHAPES.get(shape, shape) if isinstance(shape, str) else shape
    fields = source if isinstance(source, dict) else json.loads(Path(source).read_text())
    config = LlamaConfig(**{k: v for k, v in fields.items() if k not in ("architectures", "model_type")})
    config.architectures = ["LlamaForCausalLM"]
    config.bos_token_id, config.eos_token_id, config.pad_token_id = 1, 2, 3  # the tiny tokenizer's
    return config


def make_random_model(shape: str, out: Path, device: torch.device, dtype=torch.bfloat16) -> int:
    """Save a random-init model of `shape` made directly on `device` in `dtype`, with the tiny tokenizer, to `out`
    (written to a temporary folder, then renamed); returns its parameter count."""
    from transformers import AutoModelForCausalLM

    config = llama_config(shape)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size="5GB")
    for name in TINY_FILES[1:]:
        shutil.copy(TINY_LLAMA_DIR / name, tmp / name)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return sum(p.numel() for p in model.parameters())


def make_long_sft(out: Path, seq_len: int, n_examples: int, seed: int = 0) -> int:
    """SFT records from the bundled ones joined into instructions and answers of about half a target length each,
    the target drawn from seq_len/4 .. seq_len tiny-tokenizer tokens, so batches really reach the sequence length;
    returns the number written."""
    from common.data import read_records
    from common.model import load_tokenizer

    tokenizer = load_tokenizer(TINY_LLAMA_DIR)
    records = read_records(REPO / "data" / "sft" / "train.jsonl")
    texts = [" ".join(v for v in r.data.values() if isinstance(v, str) and v) for r in records]
    lengths = [len(tokenizer(t, add_special_tokens=False).input_ids) + 1 for t in texts]
    rng = random.Random(seed)

    def fill(target: int) -> str:
        parts, used = [], 0
        while used < target:
            i = rng.randrange(len(texts))
            parts.append(texts[i])
            used += lengths[i]
        return "\n".join(parts)

    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for _ in range(n_examples):
            target = rng.randint(seq_len // 4, seq_len)
            record = {"instruction": fill(target // 2), "input": "", "output": fill(target - target // 2)}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return n_examples


def random_4bit_model(config, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """`config`'s model with every decoder projection an NF4 Linear4bit (double quant, blocks of 64: the recipes'
    QLoRA settings), built on the meta device and filled one layer at a time on `device` from random bf16 weights
    (normal, std config.initializer_range); embeddings, norms (ones) and head made on `device` the same way."""
    import bitsandbytes as bnb

    from common.layer_split import meta_model
    from common.model import bnb_quantization_config, disable_bnb_cpu_inference_repack

    model, _ = meta_model(config, dtype, bnb_quantization_config("nf4", dtype))
    generator = torch.Generator(device=device).manual_seed(seed)
    std = config.initializer_range
    for layer in model.model.layers:
        for module in layer.modules():
            if not isinstance(module, bnb.nn.Linear4bit):
                continue
            meta = module.weight
            full = torch.empty(meta.shape, dtype=dtype, device=device).normal_(0.0, std, generator=generator)
            module.weight = bnb.nn.Params4bit(full, requires_grad=False, blocksize=meta.blocksize,
                                              quant_type=meta.quant_type, compress_statistics=meta.compress_statistics,
                                              quant_storage=module.quant_storage, module=module).to(device)
            del full
    for module in model.modules():  # what is left on meta: embeddings, norms, head
        for name, param in list(module.named_parameters(recurse=False)):
            if not param.is_meta:
                continue
            value = torch.empty(param.shape, dtype=dtype, device=device)
            if param.ndim == 1:
                value.fill_(1.0)
            else:
                value.normal_(0.0, std, generator=generator)
            module._parameters[name] = torch.nn.Parameter(value, requires_grad=False)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    with torch.device(device):  # its inv_freq buffer is computed at construction
        model.model.rotary_emb = type(model.model.rotary_emb)(config=model.config)
    disable_bnb_cpu_inference_repack(model)
    model.is_loaded_in_4bit = True  # what transformers' bnb loader sets: peft's k-bit preparation keys on it
    return model


def qlora_estimate_gb(config, seq_len: int, checkpointing: bool) -> float:
    """tools/estimate_memory.py's per-GPU total for this QLoRA run (batch 1, the recipes' defaults)."""
    sys.path.insert(0, str(REPO / "tools"))
    from estimate_memory import Shape, estimate

    heads = config.num_attention_heads
    shape = Shape("bench", config.hidden_size, config.intermediate_size, config.num_hidden_layers, heads,
                  config.num_key_value_heads or heads, config.vocab_size, getattr(config, "head_dim", 0) or 0,
                  bool(config.tie_word_embeddings))
    result = estimate(shape, "qlora", seq_len=seq_len, batch_size=1, gradient_checkpointing=checkpointing,
                      lora_r=LORA_R, lora_dropout=LORA_DROPOUT, grad_accum=1)
    return result["total"] / 1e9


def qlora_measure(shape: str, seq_len: int, steps: int, checkpointing: list[bool], seed: int = 0) -> list[dict]:
    """QLoRA training steps of the random NF4 model of `shape` (see the module docstring); one result per
    checkpointing setting."""
    from common.losses import token_loss_sum
    from common.model import add_lora, count_parameters, prepare_for_lora_training
    from common.optim import make_optimizer

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    config = llama_config(shape)
    built = time.perf_counter()
    model = random_4bit_model(config, device, dtype, seed)
    weights_gb = torch.cuda.memory_allocated() / 1e9 if cuda else float("nan")
    model = prepare_for_lora_training(model, True, checkpointing[0])
    model = add_lora(model, LORA_R, LORA_ALPHA, LORA_DROPOUT, ["all-linear"])
    trainable, total = count_parameters(model)
    optimizer = make_optimizer(model, "paged_adamw_8bit" if cuda else "adamw", 2e-4, 0.0, device)
    print(f"model    {shape}: {total / 1e9:.2f}B parameters (NF4 + double quant, random), LoRA r={LORA_R} "
          f"{trainable / 1e6:.1f}M trainable | {weights_gb:.2f} GB on the GPU after quantizing | built in "
          f"{time.perf_counter() - built:.1f}s | seq {seq_len}, batch 1, {dtype}", flush=True)
    autocast = torch.autocast("cuda", dtype=dtype) if cuda else contextlib.nullcontext()
    generator = torch.Generator(device=device).manual_seed(seed)
    trainable_params = [p for p in model.parameters() if p.requires_grad]
    results = []
    model.train()
    for ckpt in checkpointing:
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_disable()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        seconds, losses = [], []
        for _ in range(steps):
            start = time.perf_counter()
            ids = torch.randint(4, min(config.vocab_size, 2048), (1, seq_len), device=device, generator=generator)
            with autocast:
                logits = model(input_ids=ids, use_cache=False).logits
                loss = token_loss_sum(logits, ids) / (seq_len - 1)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable_params, 0.3)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())  # waits for the step to finish
            seconds.append(time.perf_counter() - start)
        timed = seconds[1:] or seconds  # the first step carries the warm-up
        result = {"shape": shape, "checkpointing": ckpt, "seq_len": seq_len, "steps": steps,
                  "tok_s": seq_len / statistics.median(timed), "loss_first": losses[0], "loss_last": losses[-1],
                  "peak_alloc_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else None,
                  "peak_reserved_gb": torch.cuda.max_memory_reserved() / 1e9 if cuda else None,
                  "weights_gb": weights_gb if cuda else None,
                  "estimate_gb": qlora_estimate_gb(config, seq_len, ckpt)}
        print("RESULT " + json.dumps(result), flush=True)
        results.append(result)
    return results


def parse_bools(text: str) -> list[bool]:
    return [parse_bool(v) for v in text.split(",") if v]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    one = sub.add_parser("make-1b", help="save a random Llama-3.2-1B-shaped model (bf16, made on the GPU)")
    one.add_argument("out_dir")
    one.add_argument("--shape", default="llama3.2-1b", help=f"one of {', '.join(SHAPES)} or a config.json")
    long = sub.add_parser("long-sft", help="write SFT records that reach --seq_len tiny-tokenizer tokens")
    long.add_argument("out")
    long.add_argument("--seq_len", type=int, default=2048)
    long.add_argument("--examples", type=int, default=256)
    qlora = sub.add_parser("qlora", help="QLoRA tok/s and peak memory of a random NF4 model built layer by layer")
    qlora.add_argument("--shape", default="llama3-8b", help=f"one of {', '.join(SHAPES)} or a config.json")
    qlora.add_argument("--seq_len", type=int, default=2048)
    qlora.add_argument("--steps", type=int, default=4)
    qlora.add_argument("--checkpointing", type=parse_bools, default=[True, False],
                       help="comma list of gradient checkpointing settings, measured in turn")
    args = p.parse_args(argv)
    if args.command == "make-1b":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        n = make_random_model(args.shape, Path(args.out_dir), device)
        print(f"random-init {args.shape}: {n / 1e9:.3f}B parameters, bf16, made on {device} -> {args.out_dir}")
    elif args.command == "long-sft":
        n = make_long_sft(Path(args.out), args.seq_len, args.examples)
        print(f"{n} SFT records of about {args.seq_len // 4}-{args.seq_len} tokens -> {args.out}")
    else:
        qlora_measure(args.shape, args.seq_len, args.steps, args.checkpointing)


if __name__ == "__main__":
    main()
