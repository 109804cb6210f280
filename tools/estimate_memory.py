"""How much memory a training run will take, before starting it: per GPU the weights, gradients, optimizer state,
activations and framework overhead, and the host RAM; or the README's "will it fit?" table.

    python tools/estimate_memory.py --model=7B --method=qlora --seq_len=2048 --batch_size=4
    python tools/estimate_memory.py --model=/models/llama-13b/config.json --method=full --zero_stage=3 \
        --offload=optimizer+params --gpus=8                                # sft/full-ft-deepspeed-offload
    python tools/estimate_memory.py --model=65B --method=qlora --fsdp --gpus=2 --seq_len=512          # sft/fsdp-qlora
    python tools/estimate_memory.py --model=65B --method=qlora --layer_split --gpus=2   # one process, --device_map=auto
    python tools/estimate_memory.py --table                 # 7B / 13B / 65B x methods against 24 GB and 80 GB cards
    python tools/estimate_memory.py --model=tiny --method=lora --device=cpu --batch_size=4 --seq_len=512
    python tools/estimate_memory.py --model=7B --stage=dpo --seq_len=1024 --batch_size=4        # rlhf/dpo-qlora
    python tools/estimate_memory.py --model=7B --stage=grpo --generations=8 --seq_len=768 --batch_size=2  # grpo-qlora

--model: a size in SHAPES (7B 13B 30B 65B 70B: Llama-1/2, vocabulary 32000, 70B with 8 KV heads), `tiny` (the
recipes' test Llama), or a config.json (or its folder). Counted, with P parameters, A LoRA parameters (rank r on the
seven projections of every layer) and n = batch_size x seq_len tokens:
- weights: P x 2 (bf16) or 4 (fp32); the projections of a 4-bit base at 4.127 bits (NF4 with double quant) or 4.156
  bits (GPTQ, group 128), its other weights in fp32 (QLoRA: peft casts them) or bf16 (GPTQ); adapters 4 A.
- gradients: 2 or 4 P (full), 4 A. optimizer: adamw 8, adamw_8bit 2, sgd 0 (torch's SGD without momentum keeps no
  state) bytes per trainable parameter, plus 4 P of fp32 master weights in a bf16 full fine-tune. ZeRO stage 1 splits
  the optimizer over the GPUs, 2 the gradients too, 3 the weights too; --offload puts the optimizer with fp32
  gradients (DeepSpeedCPUAdam), then the weights, in host RAM. --fsdp splits all three for the LoRA methods, and
  with --offload=optimizer+params (sft/fsdp-qlora's --cpu_offload) keeps them in host RAM.
- activations: what autograd keeps for backward, tensor by tensor (layer_activation_bytes) x n x layers, plus the LM
  head: 16 V bytes per token in fp32 (logits, log-softmax, two gradients), 14 V in bf16. GPTQ's trainable kernel also
  keeps each projection's dequantized weight. Checkpointing keeps each layer's input and recomputes one layer at once.
- overhead: the CUDA context (0.8 GB); DeepSpeed's buckets (ds_config.json).
- host RAM: the offloaded states (DeepSpeed's own estimator reserves 1.5x that) and the bf16 checkpoint read
  through the page cache while loading (sft/fsdp-qlora reads one layer at a time).
- total: the sum, except that a full fine-tune with one micro-batch a step (--grad_accum=1) counts the larger of
  gradients and activations: backward makes the one as it frees the other. A card fits when the total is at most
  90% of it (the rest for the caching allocator's fragmentation).

--stage (the rlhf/ recipes; QLoRA and the other LoRA methods): dpo puts the chosen and the rejected answer of each
of batch_size pairs through together, so 2 x batch_size rows; its reference costs nothing on the GPU (log-probs
computed once and stored). grpo trains on batch_size prompts x --generations completions of seq_len tokens (prompt +
completion), so that many rows, and first generates them: the KV cache of those rows (2 x layers x KV width x
seq_len per row, bf16) and the last position's logits, while the gradients are freed; the larger phase counts. Its
reference is the base with the adapter switched off, or a second copy of the adapter (counted).

--device=cpu is this repo's CPU path (fp32, torch AdamW, no CUDA context). `python bench/memory_estimate.py
--measure` trains two steps of 46 configurations (4M-35M parameters; full, LoRA, QLoRA and GPTQ LoRA; with and
without dropout and checkpointing; 256 to 2,048 tokens) and compares their peak memory with this estimate: 0.97x to
1.10x (2026-11-24); tests/tools/test_estimate_memory.py holds five of them within 20%. The GPU figures apply the same
tensor lists with bf16 sizes and have not been measured on a GPU yet.
"""
import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a standalone script: make `common` importable
from common.config import UserError, exit_on_user_error, parse_bool  # noqa: E402

GB = 1e9
CUDA_CONTEXT = 0.8 * GB  # CUDA context, cuBLAS workspaces
NF4_BITS = 4 + 8 / 64 + 32 / (64 * 256)  # 4-bit codes, an 8-bit absmax per 64 weights, an fp32 one per 256 of those
GPTQ_BITS = 4 + 16 / 128 + 4 / 128  # 4-bit codes, an fp16 scale and a 4-bit zero per group of 128
OPTIMIZER_BYTES = {"adamw": 8, "adamw_8bit": 2, "sgd": 0}
METHODS = ("full", "lora", "qlora", "int4-lora")
STAGES = ("sft", "dpo", "grpo")  # what the rows of a micro-batch are: examples, pairs, or prompts x generations
OFFLOADS = ("none", "optimizer", "optimizer+params")
REDUCE_BUCKET, ALLGATHER_BUCKET, PREFETCH_BUCKET = 2e8, 2e8, 5e7  # elements: full-ft-deepspeed-offload/ds_config.json
CARDS_GIB = (24, 80)
FIT_SHARE = 0.9
RECOMPUTE_TRANSIENT = 3  # MLP-sized gradients while a recomputed layer backpropagates (calibrated on CPU)
TINY_CONFIG = Path(__file__).resolve().parents[1] / "common" / "tiny_llama" / "config.json"


@dataclass
class Shape:
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int = 32000
    head_dim: int = 0  # 0: hidden // heads
    tied: bool = False  # LM head shares the input embeddings

    @property
    def q_dim(self) -> int:
        return self.heads * (self.head_dim or self.hidden // self.heads)

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * (self.head_dim or self.hidden // self.heads)

    def projections(self) -> list[tuple[int, int]]:
        """(in, out) of q, k, v, o, gate, up, down."""
        h, q, kv, i = self.hidden, self.q_dim, self.kv_dim, self.intermediate
        return [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]

    @property
    def layer_params(self) -> int:
        return sum(a * b for a, b in self.projections())

    @property
    def linear_params(self) -> int:
        return self.layers * self.layer_params

    @property
    def other_params(self) -> int:  # embeddings, LM head, norms
        return self.vocab * self.hidden * (1 if self.tied else 2) + (2 * self.layers + 1) * self.hidden

    @property
    def params(self) -> int:
        return self.linear_params + self.other_params

    def lora_params(self, r: int) -> int:
        return self.layers * sum(r * (a + b) for a, b in self.projections())


#   name  hidden  intermediate  layers  heads  kv_heads  vocab   params
SHAPES = {s.name: s for s in (
    Shape("7B", 4096, 11008, 32, 32, 32),   # 6.74B
    Shape("13B", 5120, 13824, 40, 40, 40),  # 13.0B
    Shape("30B", 6656, 17920, 60, 52, 52),  # 32.5B (Llama-1 "33B")
    Shape("65B", 8192, 22016, 80, 64, 64),  # 65.3B
    Shape("70B", 8192, 28672, 80, 64, 8),   # 69.0B (Llama-2, grouped-query attention)
)}


def load_shape(model: str) -> Shape:
    """A size name from SHAPES, 'tiny', or a config.json (or its folder); a one-line UserError otherwise."""
    named = {k.lower(): v for k, v in SHAPES.items()}
    if model.lower() in named:
        return named[model.lower()]
    path = TINY_CONFIG if model == "tiny" else Path(model).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise UserError(f"--model={model}: not a model size ({', '.join(SHAPES)}, tiny) nor a config.json")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); expected a model's config.json") from None
    if not isinstance(config, dict):
        raise UserError(f"{path}:1: expected a JSON object (a model's config.json), got {type(config).__name__}")
    try:
        heads = config["num_attention_heads"]
        name = "tiny" if model == "tiny" else path.parent.name
        return Shape(name, config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"], heads,
                     config.get("num_key_value_heads") or heads, config["vocab_size"], config.get("head_dim") or 0,
                     bool(config.get("tie_word_embeddings")))
    except KeyError as e:
        raise UserError(f"{path}: no '{e.args[0]}'; expected a Llama-style config.json") from None


def layer_activation_bytes(s: Shape, method: str, lora_dropout: float, r: int, fp32: bool) -> float:
    """Bytes autograd keeps per token for one decoder layer without checkpointing, as HF's Llama layer and peft's
    LoRA save them (transformers 5.23, peft 0.21; counted with saved_tensors_hooks). A frozen base projection keeps
    no input, so LoRA methods keep only the adapters' inputs and the norms' inputs."""
    h, q, kv, i = s.hidden, s.q_dim, s.kv_dim, s.intermediate
    small = 4 * (2 + s.heads)  # fp32 rsqrt of each norm, attention's logsumexp per head
    adapted = 3 * h + q + 2 * h + i  # inputs of the 7 adapted projections, one copy each
    if fp32:
        if method == "full":  # per norm input, normalized, output; q k v after RoPE, attention out; 4 MLP tensors
            return 4 * (6 * h + 2 * q + 2 * kv + 4 * i) + small
        kept = 4 * (2 * h + 2 * q + 2 * kv + 3 * i + 7 * r) + small  # norm inputs, attention, silu/up, lora_A outs
        if lora_dropout == 0:
            return kept + 4 * (2 * h + i)  # the adapters share the norm outputs and the silu*up product
        return kept + 8 * adapted  # dropout: its output and (CPU) an fp32 noise tensor per adapted projection
    if method == "full":  # bf16; RMSNorm keeps an fp32 copy of its input
        return 2 * (4 + 2 + 2) * h + 2 * (2 * q + 2 * kv + 4 * i) + small
    # under autocast every fp32 adapter keeps a bf16 copy of its input (and a 1-byte dropout mask); bitsandbytes
    # returns fp32 for QLoRA's fp32 residual stream, so its MLP tensors are fp32
    mlp = 4 if method == "qlora" else 2
    return 2 * 4 * h + 2 * (2 * q + 2 * kv) + 3 * mlp * i + 2 * 7 * r + (2 + (lora_dropout > 0)) * adapted + small


def activation_bytes(s: Shape, method: str, tokens: int, checkpointing: bool, lora_dropout: float, r: int,
                     fp32: bool, layers: int = -1) -> float:
    """Peak activation bytes of one micro-batch on a device holding `layers` decoder layers and the LM head."""
    layers = s.layers if layers < 0 else layers
    logits = tokens * s.vocab * (16 if fp32 else 14)
    final_norm = tokens * s.hidden * (12 if method == "full" else 4)
    if not checkpointing:
        return layers * layer_bytes(s, method, tokens, lora_dropout, r, fp32) + final_norm + logits
    stream = 4 if fp32 or method == "qlora" else 2  # QLoRA's residual stream is fp32 (peft's cast)
    checkpoints = layers * tokens * s.hidden * stream
    return checkpoints + final_norm + max(logits, recompute_bytes(s, method, tokens, lora_dropout, r, fp32))


def layer_bytes(s: Shape, method: str, tokens: int, lora_dropout: float, r: int, fp32: bool) -> float:
    saved = tokens * layer_activation_bytes(s, method, lora_dropout, r, fp32)
    if method == "int4-lora":  # GPTQ's trainable kernel dequantizes each weight and matmul keeps it for backward
        saved += s.layer_params * (4 if fp32 else 2)
    return saved


def recompute_bytes(s: Shape, method: str, tokens: int, lora_dropout: float, r: int, fp32: bool) -> float:
    """With checkpointing, backward recomputes one layer at a time and works through it (RECOMPUTE_TRANSIENT
    MLP-sized gradients), the logits still referenced by the training loop."""
    wide = 4 if fp32 else 2
    return (layer_bytes(s, method, tokens, lora_dropout, r, fp32) + tokens * RECOMPUTE_TRANSIENT * s.intermediate * wide
            + tokens * s.vocab * wide)


def estimate(shape: Shape, method="qlora", optimizer=None, dtype=None, zero_stage=0, offload="none", seq_len=1024,
             batch_size=1, gradient_checkpointing=None, gpus=1, lora_r=64, lora_dropout=0.05, layer_split=False,
             fsdp=False, grad_accum=4, device="cuda", stage="sft", generations=8, pp=1, tp=1) -> dict:
    """Bytes per GPU (the fullest one) and of host RAM for one training run: the keys of ROWS plus host_offload,
    host_loading, host, params and trainable. Defaults are the recipes': bf16, checkpointing and 8-bit AdamW for the
    LoRA methods on a GPU (torch AdamW under FSDP), 4 micro-batches a step; fp32, AdamW and no checkpointing on CPU."""
    dtype = dtype or ("fp32" if device == "cpu" else "bf16")
    optimizer = optimizer or ("adamw" if method == "full" or fsdp or device == "cpu" else "adamw_8bit")
    checkpointing = device == "cuda" if gradient_checkpointing is None else gradient_checkpointing
    check_options(method, optimizer, dtype, zero_stage, offload, gpus, layer_split, fsdp, device, stage)
    check_parallel_options(shape, method, zero_stage, offload, gpus, device, pp, tp)
    s, lora, fp32 = shape, method != "full", dtype == "fp32"
    rows = batch_size * {"sft": 1, "dpo": 2, "grpo": generations}[stage]
    wide = 4 if fp32 else 2
    bits = {"qlora": NF4_BITS, "int4-lora": GPTQ_BITS}.get(method, 8 * wide)  # per weight of the projections
    other = 4 if method == "qlora" else wide  # embeddings, head, norms
    adapters = s.lora_params(lora_r) if lora else 0
    trainable = adapters if lora else s.params
    reference_adapter = adapters if stage == "grpo" else 0  # GRPO from an SFT adapter keeps a frozen copy of it
    weights = s.linear_params * bits / 8 + s.other_params * other + 4 * (adapters + reference_adapter)
    gradients = trainable * (4 if lora else wide)
    # the 8-bit AdamW of bitsandbytes needs a GPU: on CPU common/optim.py falls back to torch's AdamW
    state = OPTIMIZER_BYTES["adamw" if device == "cpu" and optimizer == "adamw_8bit" else optimizer]
    opt = trainable * state + (4 * s.params if not lora and not fp32 else 0)  # + fp32 master weights
    tokens = rows * seq_len
    activations = activation_bytes(s, method, tokens, checkpointing, lora_dropout, lora_r, fp32)
    overhead = CUDA_CONTEXT if device == "cuda" else 0.0
    host_offload, host_loading = 0.0, s.params * 2  # the bf16 checkpoint passes through the page cache
    if pp > 1 or tp > 1:  # sft/full-ft-pipeline (--pp), pretrain/fsdp (--tp): FSDP2 over dp = gpus / (pp x tp)
        weights, gradients, opt, activations = parallel_shares(s, optimizer, tokens, checkpointing, gpus, pp, tp,
                                                               grad_accum, fp32)
        host_loading = 2 * s.params / pp  # each process reads only its stage's tensors
    elif not lora:  # DeepSpeed ZeRO: partitions over the GPUs, buckets from ds_config.json
        if zero_stage >= 1:
            opt /= gpus
        if zero_stage >= 2:
            gradients /= gpus
        if zero_stage == 3:
            weights /= gpus
            overhead += (REDUCE_BUCKET + PREFETCH_BUCKET + max(s.vocab * s.hidden, s.layer_params)) * wide
        elif zero_stage:
            overhead += (REDUCE_BUCKET + ALLGATHER_BUCKET) * wide
        elif gpus > 1:
            overhead += gradients  # DDP's gradient buckets: a second copy of the gradients
        if offload != "none":  # DeepSpeedCPUAdam: fp32 master, Adam states and fp32 gradients in host RAM
            host_offload += opt * gpus + 4 * s.params
            opt, gradients = 0.0, 0.0
        if offload == "optimizer+params":
            host_offload += weights * gpus
            weights = 0.0
    elif fsdp:  # 1/N of everything, plus two decoder layers gathered in bf16 (computing one, prefetching the next)
        # and the head gathered for the logits
        gathered = 2 * (s.layer_params * bits / 8 + 2 * adapters / s.layers) + 2 * s.vocab * s.hidden
        weights = weights / gpus + gathered
        gradients, opt = gradients / gpus, opt / gpus
        if offload == "optimizer+params":  # --cpu_offload: shards, their gradients and AdamW live in host RAM
            host_offload += (weights - gathered + gradients + opt) * gpus
            weights, gradients, opt = gathered, 0.0, 0.0
        host_loading = s.params * 2 / s.layers  # sft/fsdp-qlora reads and quantizes one layer at a time
    elif layer_split:  # one process, whole layers spread evenly; the last GPU also holds the head and the logits
        # (accelerate's plan is a little uneven: 36 and 44 layers of 65B in NF4 under 22 GiB caps)
        share = math.ceil(s.layers / gpus) / s.layers
        head = s.vocab * s.hidden * other
        weights = (weights - head * (1 if s.tied else 2)) * share + head
        gradients, opt = gradients * share, opt * share
        activations = activation_bytes(s, method, tokens, checkpointing, lora_dropout, lora_r, fp32,
                                       math.ceil(s.layers / gpus))
    # A full fine-tune with one micro-batch per step makes its gradients as backward frees the activations, so the
    # larger counts: the gradients with the logits the training loop still references in the optimizer step, or,
    # checkpointed, with the first layer recomputed at the end of backward. LoRA's gradients grow while backward's
    # working set stays (one recomputed layer), and accumulation keeps gradients across forwards: then both count.
    step = 0.0
    if device == "cpu":  # torch AdamW steps one tensor at a time on CPU: two temporaries the size of the largest
        step = 2 * 4 * (lora_r * s.intermediate if lora else max(s.vocab * s.hidden, s.hidden * s.intermediate))
    if grad_accum > 1 or lora:
        grads_and_acts = gradients + step + activations
    else:
        last = recompute_bytes(s, method, tokens, lora_dropout, lora_r, fp32) if checkpointing else 0
        grads_and_acts = max(gradients + step + tokens * s.vocab * wide, activations, gradients + last)
    gradients += step  # shown with the gradients
    generation = 0.0
    if stage == "grpo":  # sampling: the KV cache of every row (K and V of every layer) and the next-token logits
        kv_layers = math.ceil(s.layers / gpus) if layer_split else s.layers
        generation = rows * seq_len * kv_layers * 2 * s.kv_dim * wide + rows * s.vocab * 4
    total = weights + opt + overhead + max(grads_and_acts, generation)
    return {"weights": weights, "gradients": gradients, "optimizer": opt, "activations": activations,
            "generation": generation, "overhead": overhead, "total": total, "host_offload": host_offload,
            "host_loading": host_loading, "host": host_offload + host_loading, "params": s.params,
            "trainable": trainable}


def parallel_shares(s: Shape, optimizer: str, tokens: int, checkpointing: bool, gpus: int, pp: int, tp: int,
                    grad_accum: int, fp32: bool) -> tuple[float, float, float, float]:
    """(weights, gradients, optimizer, activations) per GPU of a full fine-tune in pp pipeline stages, each stage's
    matrices split tp ways (tensor parallel) and its parameters sharded over dp = gpus / (pp x tp) with FSDP2: fp32
    master shards, gradients and AdamW; two decoder layers gathered in the compute dtype. The fullest stage counts:
    the first (the embedding; 1F1B keeps min(pp, grad_accum) micro-batches' activations alive there) or the last
    (the LM head, its logits, one micro-batch). Activations split tp ways (sequence parallel; approximate: the
    logits are whole on every tp rank)."""
    dp = gpus // (pp * tp)
    wide = 4 if fp32 else 2
    stage_layers = math.ceil(s.layers / pp)
    layer = s.layer_params + 2 * s.hidden  # the projections and the layer's two norms
    # one stage: the embedding and the head (once if tied) and the final norm; more: the last stage's head and norm
    ends = s.vocab * s.hidden * (1 if s.tied or pp > 1 else 2) + s.hidden
    stage = (stage_layers * layer + ends) / tp
    gathered = 2 * s.layer_params * wide / tp
    weights = 4 * stage / dp + gathered
    gradients = 4 * stage / dp
    opt = OPTIMIZER_BYTES[optimizer] * stage / dp
    last = activation_bytes(s, "full", tokens, checkpointing, 0.0, 0, fp32, stage_layers)
    head_part = activation_bytes(s, "full", tokens, checkpointing, 0.0, 0, fp32, 0)
    first = (last - head_part) * min(pp, grad_accum) + recompute_bytes(s, "full", tokens, 0.0, 0, fp32) * checkpointing
    return weights, gradients, opt, max(first, last) / tp


def check_parallel_options(s: Shape, method, zero_stage, offload, gpus, device, pp, tp):
    """One-line UserErrors for --pp and --tp that do not fit the run."""
    if pp < 1 or tp < 1:
        raise UserError(f"--pp={pp} --tp={tp}: expected 1 or more each")
    if pp == 1 and tp == 1:
        return
    if method != "full" or zero_stage or offload != "none" or device != "cuda":
        raise UserError("--pp and --tp model full fine-tuning on GPUs with FSDP2 (sft/full-ft-pipeline, "
                        "pretrain/fsdp): --method=full, no --zero_stage or --offload")
    if gpus % (pp * tp):
        raise UserError(f"--gpus={gpus}: must be a whole multiple of --pp x --tp = {pp * tp}")
    if pp > s.layers:
        raise UserError(f"--pp={pp}: the model has {s.layers} decoder layers, at least one per stage")
    if s.heads % tp or s.kv_heads % tp:
        raise UserError(f"--tp={tp}: must divide the {s.heads} attention and {s.kv_heads} key/value heads")


def check_options(method, optimizer, dtype, zero_stage, offload, gpus, layer_split, fsdp, device, stage="sft"):
    """One-line UserErrors for values that are unknown or do not go together."""
    for name, value, valid in (("method", method, METHODS), ("stage", stage, STAGES),
                               ("optimizer", optimizer, tuple(OPTIMIZER_BYTES)),
                               ("dtype", dtype, ("bf16", "fp32")), ("zero_stage", zero_stage, (0, 1, 2, 3)),
                               ("offload", offload, OFFLOADS), ("device", device, ("cuda", "cpu"))):
        if value not in valid:
            raise UserError(f"--{name}={value}: expected one of {', '.join(map(str, valid))}")
    if gpus < 1:
        raise UserError(f"--gpus={gpus}: expected 1 or more")
    if device == "cpu" and (dtype != "fp32" or zero_stage or offload != "none" or gpus > 1 or layer_split or fsdp):
        raise UserError("--device=cpu models one fp32 process (the recipes' CPU path): no --dtype=bf16, --zero_stage, "
                        "--offload, --gpus, --layer_split or --fsdp")
    if method == "full" and (layer_split or fsdp):
        raise UserError("--layer_split and --fsdp are for the LoRA methods; a full fine-tune shards with --zero_stage")
    if method != "full" and (zero_stage or offload not in ("none", "optimizer+params" if fsdp else "none")):
        raise UserError("--zero_stage and --offload are DeepSpeed options of --method=full (and --fsdp takes "
                        "--offload=optimizer+params: sft/fsdp-qlora's --cpu_offload)")
    if stage != "sft" and (method == "full" or fsdp):
        raise UserError(f"--stage={stage}: the rlhf/ recipes train LoRA adapters in one process per GPU (DDP); "
                        "no --method=full or --fsdp")
    if layer_split and fsdp:
        raise UserError("--layer_split and --fsdp are two ways to split a model; choose one")
    if offload != "none" and not fsdp and (zero_stage == 0 or optimizer != "adamw"):
        raise UserError(f"--offload={offload} needs --zero_stage=1/2/3 and --optimizer=adamw (DeepSpeedCPUAdam)")
    if offload == "optimizer+params" and zero_stage != 3 and not fsdp:
        raise UserError("--offload=optimizer+params needs --zero_stage=3 (ZeRO-2 keeps the full weights on every GPU)")


ROWS = (("weights", "weights"), ("gradients", "gradients"), ("optimizer", "optimizer state"),
        ("activations", "activations"), ("generation", "generation (KV cache)"), ("overhead", "framework overhead"),
        ("total", "total per GPU"))


def fits(total: float) -> list[str]:
    return [f"{gib} GB card: {'fits' if total <= FIT_SHARE * gib * 2**30 else 'does not fit'}" for gib in CARDS_GIB]


def print_run(shape: Shape, args, r: dict):
    split = " (layer split)" if args.layer_split else " (FSDP)" if args.fsdp else ""
    if args.pp > 1 or args.tp > 1:
        split = f" (pp {args.pp} x tp {args.tp} x dp {args.gpus // (args.pp * args.tp)}, FSDP2)"

    def size(n):
        return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"

    print(f"model {shape.name}: {size(r['params'])} parameters, {size(r['trainable'])} trainable | "
          f"{args.method} | {args.device} x {args.gpus}{split} | micro-batch {args.batch_size} x {args.seq_len} tokens")
    if args.stage != "sft":
        rows = {"dpo": "2 rows (chosen, rejected) per pair",
                "grpo": f"{args.generations} completions per prompt; the larger of training and generation counts"}
        print(f"stage {args.stage}: {rows[args.stage]}")
    for key, label in ROWS:
        if key == "generation" and args.stage != "grpo":
            continue
        print(f"  {label if args.device == 'cuda' else label.replace(' per GPU', ''):<20}{r[key] / GB:>9.2f} GB")
    if args.device == "cuda":
        print(f"  {'host RAM':<20}{r['host'] / GB:>9.2f} GB  (offloaded {r['host_offload'] / GB:.1f} GB + loading "
              f"{r['host_loading'] / GB:.1f} GB: the bf16 checkpoint read through the page cache)")
        print("  " + "; ".join(fits(r["total"])) + f" (fits: total <= {FIT_SHARE:.0%} of the card)")


TABLE_RUNS = (  # (label, options, GPUs); the full fine-tunes as sft/full-ft-deepspeed-offload runs them
    ("full, ZeRO-2 + offload optimizer", {"method": "full", "zero_stage": 2, "offload": "optimizer"}, 1),
    ("full, ZeRO-3 + offload optimizer and weights", {"method": "full", "zero_stage": 3,
                                                      "offload": "optimizer+params"}, 1),
    ("LoRA, bf16 base", {"method": "lora"}, 1),
    ("QLoRA, NF4 base", {"method": "qlora"}, 1),
    ("int4 LoRA, GPTQ base", {"method": "int4-lora"}, 1),
    ("QLoRA, layer split (--device_map=auto)", {"method": "qlora", "layer_split": True}, 2),
    ("FSDP-QLoRA (sft/fsdp-qlora, AdamW)", {"method": "qlora", "fsdp": True}, 2),
    ("FSDP-QLoRA + --cpu_offload", {"method": "qlora", "fsdp": True, "offload": "optimizer+params"}, 2),
    ("full, pipeline 4 stages x 2 dp (sft/full-ft-pipeline)", {"method": "full", "pp": 4}, 8),
    ("full, pipeline 8 stages (sft/full-ft-pipeline)", {"method": "full", "pp": 8}, 8),
    ("full, pipeline 8 stages x 2 dp, two nodes", {"method": "full", "pp": 8}, 16),
    ("full, pipeline 8 stages x tp 2, two nodes", {"method": "full", "pp": 8, "tp": 2}, 16),
)


def print_table(args):
    print(f"GPU memory per GPU, estimated: micro-batch {args.batch_size} x {args.seq_len} tokens, bf16, activation "
          f"checkpointing, LoRA r={args.lora_r} on every projection, 8-bit AdamW for LoRA")
    print("| model | method | GPUs | per GPU | host RAM | 24 GB card | 80 GB card |\n|---|---|---:|---:|---:|---|---|")
    for name in ("7B", "13B", "65B"):
        for label, options, gpus in TABLE_RUNS:
            pipeline = "pp" in options  # 13B and 65B; the other multi-GPU rows: 65B
            if (pipeline and name == "7B") or (gpus > 1 and not pipeline and name != "65B"):
                continue
            r = estimate(SHAPES[name], seq_len=args.seq_len, batch_size=args.batch_size, lora_r=args.lora_r,
                         gpus=gpus, **options)
            ok = ["yes" if "does not" not in f else "no" for f in fits(r["total"])]
            print(f"| {name} | {label} | {gpus} | {r['total'] / GB:.1f} GB | {r['host'] / GB:,.0f} GB | "
                  f"{' | '.join(ok)} |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="7B", help=f"{', '.join(SHAPES)}, tiny, or a config.json")
    p.add_argument("--method", default="qlora", help=", ".join(METHODS))
    p.add_argument("--optimizer", default=None, help="adamw, adamw_8bit or sgd (default: the recipe's)")
    p.add_argument("--dtype", default=None, help="bf16 or fp32 weights and compute (default: bf16 on GPU)")
    p.add_argument("--zero_stage", type=int, default=0, help="DeepSpeed ZeRO stage 0-3 (--method=full)")
    p.add_argument("--offload", default="none", help="none, optimizer, optimizer+params (DeepSpeed, host RAM)")
    p.add_argument("--seq_len", type=int, default=1024, help="tokens per sequence")
    p.add_argument("--batch_size", type=int, default=1, help="micro-batch per GPU")
    p.add_argument("--grad_accum", type=int, default=4, help="micro-batches per step (1: a full fine-tune's "
                   "gradients and activations do not coexist)")
    p.add_argument("--gradient_checkpointing", type=parse_bool, default=None, help="true/false (default: on a GPU)")
    p.add_argument("--gpus", type=int, default=1, help="GPUs of one node")
    p.add_argument("--lora_r", type=int, default=64, help="LoRA rank, on every projection")
    p.add_argument("--lora_dropout", type=float, default=0.05, help="> 0 keeps an extra copy of each adapter's input")
    p.add_argument("--layer_split", type=parse_bool, nargs="?", const=True, default=False,
                   help="LoRA methods: one process, the layers spread over the GPUs (--device_map=auto)")
    p.add_argument("--fsdp", type=parse_bool, nargs="?", const=True, default=False,
                   help="LoRA methods: FSDP shards the model over the GPUs (sft/fsdp-qlora)")
    p.add_argument("--pp", type=int, default=1, help="--method=full: pipeline stages (sft/full-ft-pipeline); "
                   "--gpus is then every GPU of the run, dp = gpus / (pp x tp)")
    p.add_argument("--tp", type=int, default=1, help="--method=full: tensor-parallel ranks (--tp of "
                   "sft/full-ft-pipeline and pretrain/fsdp)")
    p.add_argument("--device", default="cuda", help="cuda, or cpu: the repo's fp32 CPU path")
    p.add_argument("--stage", default="sft", help="sft, dpo (rlhf/dpo-qlora: pairs) or grpo (rlhf/grpo-qlora)")
    p.add_argument("--generations", type=int, default=8, help="grpo: completions sampled per prompt")
    p.add_argument("--table", action="store_true", help="print the README's will-it-fit table and exit")
    args = p.parse_args(argv)
    with exit_on_user_error():
        if args.table:
            return print_table(args)
        shape = load_shape(args.model)
        r = estimate(shape, args.method, args.optimizer, args.dtype, args.zero_stage, args.offload, args.seq_len,
                     args.batch_size, args.gradient_checkpointing, args.gpus, args.lora_r, args.lora_dropout,
                     args.layer_split, args.fsdp, args.grad_accum, args.device, args.stage, args.generations,
                     args.pp, args.tp)
        print_run(shape, args, r)


if __name__ == "__main__":
    main()
