#!/usr/bin/env bash
# GPU benchmarks for one H100 / H200 node: five measurements, each with its log under $OUT, and a summary table
# parsed from the logs at the end.
#
# NOT RUN ON A GPU YET. It was written on a CPU-only machine and checked there only with `bash -n`, `--dry-run` and
# the 65B snippet on the tiny config. Expect small fixes on the first real run. Nothing is downloaded: every model
# is random-init from a config, tokenized with the bundled tiny tokenizer (2,048 tokens).
#
#   1 pretrain_1b        full training, bf16, random-init 1B (common/model_configs/1b.json, vocabulary = the tiny
#                        tokenizer's 2,048 rows), pretrain/fsdp, sequence $SEQ: tok/s/GPU and MFU from the step log
#   2 qlora_8b           a random-init 8B (Llama-3-8B shape, or CONFIG_8B=common/model_configs/7b.json) saved in bf16 to
#                        $MODEL_8B, then sft/qlora at sequence $SEQ with its own defaults (paged 8-bit AdamW), and
#                        bench/peers.py --family sft (ours vs Trainer + peft vs TRL, torch AdamW for all) on the same
#                        model and data: the "1.5x" comparison
#   3 gptq_lora_8b       data_scripts/quantize_gptq.py on the random 8B, then sft/peft-int4 (LoRA on GPTQ int4)
#   4 fullft_offload_8b  sft/full-ft-deepspeed-offload (ZeRO-2, optimizer on CPU) on the random 8B. Needs about
#                        18 bytes/parameter of host RAM (fp32 master weights, gradients and Adam states, plus the bf16
#                        load), about 145 GB for 8B. It is skipped when the machine has less (FORCE=1 tries anyway;
#                        MODEL_FULLFT=<smaller model folder> measures something that fits).
#   5 qlora_65b_memory   peak GPU memory of QLoRA at 65B (common/model_configs/65b.json), sequence $SEQ, batch 1,
#                        gradient checkpointing. A random 65B cannot be loaded without about 130 GB of host RAM
#                        in bf16, so the model is built on the meta device and each projection is quantized to NF4
#                        (double quant) on the GPU from random bf16 weights, one at a time. Then the recipe's own
#                        pieces (prepare_for_lora_training, add_lora r=64, paged 8-bit AdamW, token_loss_sum, bf16
#                        autocast) run $STEPS_65B steps. This is not sft/qlora's run.sh, which would need that
#                        checkpoint on disk. bench/memory_estimate.py's estimate is logged beside it.
# The sft runs train on $OUT/data/sft_long.jsonl: the bundled SFT records joined into examples of SEQ/4 to SEQ
# tokens, so that the sequence length is really used.
#
# Usage:  bash bench/gpu.sh [--dry-run] [--key=value ...]
#   --dry-run      print the commands it would run, and run nothing (works without a GPU)
#   --key=value    passed to every recipe run (pretrain/fsdp, sft/qlora, sft/peft-int4, sft/full-ft-deepspeed-offload),
#                  so only options they all have: e.g. --log_every=5 --attn_implementation=sdpa
# Environment (defaults in brackets): OUT [bench_gpu_out], ONLY [all five, comma-separated names], STEPS [30],
#   ROUNDS [2] (peers rounds), SEQ [2048], NGPU [1] (pretrain_1b), BATCH_1B [8], BATCH_8B [4], CONFIG_8B [llama3-8b |
#   a config.json], MODEL_8B [$OUT/models/random-8b], GPTQ_8B [$OUT/models/random-8b-gptq-int4], GPTQ_SAMPLES [32],
#   MODEL_FULLFT [$MODEL_8B], FORCE [0], CONFIG_65B [common/model_configs/65b.json], STEPS_65B [3],
#   SFT_EXAMPLES [512], KEEP [0] (1: keep each run's final/ checkpoint; by default deleted to save disk), PYTHON [python]
# Disk: about 16 GB (8B bf16) + 6 GB (8B GPTQ) in $OUT/models; the runs' checkpoints are deleted unless KEEP=1.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/torch_extensions}
export TOKENIZERS_PARALLELISM=false

OUT=${OUT:-bench_gpu_out}
[[ "$OUT" = /* ]] || OUT="$PWD/$OUT"
ALL="pretrain_1b,qlora_8b,gptq_lora_8b,fullft_offload_8b,qlora_65b_memory"
ONLY=${ONLY:-$ALL}
STEPS=${STEPS:-30}
ROUNDS=${ROUNDS:-2}
SEQ=${SEQ:-2048}
export NGPU=${NGPU:-1}
BATCH_1B=${BATCH_1B:-8}
BATCH_8B=${BATCH_8B:-4}
CONFIG_8B=${CONFIG_8B:-llama3-8b}
MODEL_8B=${MODEL_8B:-$OUT/models/random-8b}
GPTQ_8B=${GPTQ_8B:-$OUT/models/random-8b-gptq-int4}
GPTQ_SAMPLES=${GPTQ_SAMPLES:-32}
MODEL_FULLFT=${MODEL_FULLFT:-$MODEL_8B}
FORCE=${FORCE:-0}
CONFIG_65B=${CONFIG_65B:-$REPO/common/model_configs/65b.json}
STEPS_65B=${STEPS_65B:-3}
SFT_EXAMPLES=${SFT_EXAMPLES:-512}
LONG_SFT=$OUT/data/sft_long.jsonl
KEEP=${KEEP:-0}
PYTHON=${PYTHON:-python}

DRY=0
EXTRA=()
for arg in "$@"; do
  case "$arg" in
    --dry-run|--dry_run) DRY=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d'; exit 0 ;;
    *) EXTRA+=("$arg") ;;
  esac
done
for name in ${ONLY//,/ }; do
  [[ ",$ALL," == *",$name,"* ]] || { echo "ONLY: unknown measurement '$name' (known: $ALL)" >&2; exit 2; }
done
wanted() { [[ ",$ONLY," == *",$1,"* ]]; }

# ---- the small Python helpers, written to $OUT/snippets/ so that a log line names a file you can read and rerun

read -r -d '' MAKE_MODEL <<'PY' || true
"""Save a random-init Llama in bf16 with the tiny tokenizer: argv = llama3-8b | config.json, out_dir."""
import shutil, sys
from pathlib import Path
import torch
from transformers import AutoModelForCausalLM, LlamaConfig
from common.model import TINY_FILES, TINY_LLAMA_DIR
name, out = sys.argv[1], Path(sys.argv[2])
if name == "llama3-8b":  # Llama 3 8B's shape
    config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                         rms_norm_eps=1e-5, tie_word_embeddings=False)
else:
    config = LlamaConfig.from_pretrained(name)
config.bos_token_id, config.eos_token_id, config.pad_token_id = 1, 2, 3  # the tiny tokenizer's ids
torch.manual_seed(0)
with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
tmp = out.with_name(out.name + ".tmp")
shutil.rmtree(tmp, ignore_errors=True)
model.save_pretrained(tmp, max_shard_size="5GB")
for f in TINY_FILES[1:]:
    shutil.copy(TINY_LLAMA_DIR / f, tmp / f)
tmp.rename(out)
print(f"random-init {name}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters, bf16 -> {out}")
PY

read -r -d '' MAKE_LONG_SFT <<'PY' || true
"""Long SFT examples from the bundled records: argv = seq_len, n_examples, out.jsonl. Each example joins random
records' texts into an instruction and an answer of about half the target length each, the target drawn from
seq_len/4 .. seq_len tokens (tiny tokenizer), so batches hold mixed lengths up to the full sequence."""
import json, random, sys
from pathlib import Path
from common.data import read_records
from common.gptq import SAMPLE_CALIBRATION  # data/sft/train.jsonl, the bundled SFT records
from common.model import TINY_LLAMA_DIR, load_tokenizer
seq, n, out = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
tok = load_tokenizer(TINY_LLAMA_DIR)
texts = [" ".join(v for v in r.data.values() if isinstance(v, str) and v) for r in read_records(SAMPLE_CALIBRATION)]
lengths = [len(tok(t, add_special_tokens=False).input_ids) + 1 for t in texts]
rng = random.Random(0)
def fill(target):
    parts, used = [], 0
    while used < target:
        i = rng.randrange(len(texts))
        parts.append(texts[i])
        used += lengths[i]
    return "\n".join(parts)
out.parent.mkdir(parents=True, exist_ok=True)
with open(out, "w", encoding="utf-8") as f:
    for _ in range(n):
        target = rng.randint(seq // 4, seq)
        f.write(json.dumps({"instruction": fill(target // 2), "input": "", "output": fill(target - target // 2)},
                           ensure_ascii=False) + "\n")
print(f"{n} SFT examples of about {seq // 4}-{seq} tokens -> {out}")
PY

read -r -d '' HOST_RAM_CHECK <<'PY' || true
"""Exit 0 when this machine has the host RAM a ZeRO-2 optimizer-offload full fine-tune of argv[1] needs, else 3."""
import json, sys
from pathlib import Path
c = json.loads((Path(sys.argv[1]) / "config.json").read_text())
h, i, L, V = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
kv = c.get("num_key_value_heads", c["num_attention_heads"]) * (c.get("head_dim") or h // c["num_attention_heads"])
params = L * (2 * h * h + 2 * h * kv + 3 * h * i + 2 * h) + 2 * V * h + h
need = params * 18  # fp32 master weights 4 + fp32 gradients 4 + Adam states 8, on CPU; + the bf16 load 2
avail = next(int(l.split()[1]) * 1024 for l in open("/proc/meminfo") if l.startswith("MemAvailable"))
print(f"full fine-tune, ZeRO-2 + optimizer offload, {params / 1e9:.2f}B parameters: needs about {need / 1e9:.0f} GB "
      f"of host RAM, {avail / 1e9:.0f} GB available")
sys.exit(0 if avail >= need else 3)
PY

read -r -d '' QLORA_MEMORY <<'PY' || true
"""Peak GPU memory of QLoRA training on a random-init model too big to load: argv = config.json, seq_len, steps.
Built on the meta device; every decoder projection becomes an NF4 (double quant) Linear4bit quantized on the device
from random bf16 weights, one at a time (host RAM stays small); embeddings, norms and head materialized on the
device. Then what sft/qlora does: prepare_for_lora_training (norms and head fp32, gradient checkpointing), add_lora
(r=64, alpha 16, dropout 0.05, every projection), paged 8-bit AdamW, bf16 autocast, token_loss_sum; batch 1."""
import contextlib, sys, time
import bitsandbytes as bnb
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from common.logs import peak_memory_gb
from common.losses import token_loss_sum
from common.model import add_lora, count_parameters, disable_bnb_cpu_inference_repack, prepare_for_lora_training
from common.optim import make_optimizer
config_path, seq, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
cuda = torch.cuda.is_available()
device = torch.device("cuda" if cuda else "cpu")
dtype = torch.bfloat16 if cuda else torch.float32
config = AutoConfig.from_pretrained(config_path)
torch.manual_seed(0)
with torch.device("meta"):
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
for layer in model.model.layers:
    for parent in (layer.self_attn, layer.mlp):
        for name, lin in list(parent.named_children()):
            if not isinstance(lin, torch.nn.Linear):
                continue
            q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=dtype,
                                  compress_statistics=True, quant_type="nf4", quant_storage=torch.uint8, device="meta")
            w = torch.randn(lin.out_features, lin.in_features, dtype=dtype, device=device) * config.initializer_range
            q.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=True, quant_type="nf4",
                                         quant_storage=torch.uint8, module=q).to(device)
            del w
            setattr(parent, name, q)
for module in model.modules():  # what is left on meta: embeddings, norms, head
    for name, p in list(module.named_parameters(recurse=False)):
        if p.is_meta:
            data = torch.empty(p.shape, dtype=dtype, device=device)
            data.fill_(1.0) if p.ndim == 1 else data.normal_(0.0, config.initializer_range)
            setattr(module, name, torch.nn.Parameter(data, requires_grad=False))
model.model.rotary_emb = type(model.model.rotary_emb)(config=model.config).to(device)
model.is_loaded_in_4bit = True  # what transformers' bnb loader sets: peft's k-bit preparation keys on it
disable_bnb_cpu_inference_repack(model)
weights_gb = torch.cuda.memory_allocated() / 1e9 if cuda else float("nan")
model = prepare_for_lora_training(model, True, True)
model = add_lora(model, 64, 16, 0.05, ["all-linear"])
trainable, total = count_parameters(model)
optimizer = make_optimizer(model, "paged_adamw_8bit", 2e-4, 0.0, device)
print(f"model    {config_path}: {total / 1e9:.2f}B parameters (NF4 + double quant, random), LoRA r=64 "
      f"{trainable / 1e6:.1f}M trainable | weights on the GPU after quantizing {weights_gb:.2f} GB | seq {seq}, "
      f"batch 1, gradient checkpointing, {dtype}", flush=True)
autocast = (lambda: torch.autocast("cuda", dtype=dtype)) if cuda else contextlib.nullcontext
model.train()
vocab = min(config.vocab_size, 2048)
seconds = 0.0
for step in range(1, steps + 1):
    t0 = time.perf_counter()
    ids = torch.randint(4, vocab, (1, seq), device=device)
    with autocast():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids),
                       position_ids=torch.arange(seq, device=device)[None]).logits
        loss = token_loss_sum(logits, ids) / (seq - 1)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 0.3)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
    seconds += time.perf_counter() - t0
    print(f"step {step}/{steps} | loss {loss.item():.4f} | mem {peak_memory_gb(device):.2f} GB", flush=True)
reserved = torch.cuda.max_memory_reserved() / 1e9 if cuda else float("nan")
print(f"max reserved by the allocator {reserved:.2f} GB")
print(f"done: {steps} steps in {seconds:.1f}s, {steps * seq / seconds:,.0f} tok/s, peak mem {peak_memory_gb(device):.2f} GB")
PY

read -r -d '' SUMMARY <<'PY' || true
"""The summary table, from the logs in argv[1]."""
import re, statistics, sys
from pathlib import Path
out = Path(sys.argv[1])
DONE = re.compile(r"done: (\d+) steps in ([\d.]+)s, ([\d,]+) tok/s, peak mem ([\d.]+) GB")
def read(name):
    p = out / f"{name}.log"
    return p.read_text(errors="replace") if p.is_file() else None
def done(text):
    m = DONE.findall(text or "")
    return m[-1] if m else None
rows = []
def add(name, what, text, per_gpu="-", mfu="-", note="", fallback=""):
    d = done(text)
    if text is None:
        rows.append((name, what, "-", "-", "-", "-", "-", "not run"))
    elif "SKIPPED" in text:
        rows.append((name, what, "-", "-", "-", "-", "-", text[text.index("SKIPPED"):].splitlines()[0]))
    elif d is None:
        rows.append((name, what, "-", "-", "-", "-", "-", f"FAILED: see {out / f'{name}.log'}" + fallback))
    else:
        rows.append((name, what, d[0], d[2], per_gpu, mfu, d[3], note))
text = read("pretrain_1b")
steps = re.findall(r"step (\d+)/\d+ \|.*?\| ([\d,]+) tok/s/gpu(?: \| mfu ([\d.]+)%)?", text or "")
later = [s for s in steps if int(s[0]) > 1] or steps  # step 1 carries the warm-up
per_gpu = f"{statistics.median(int(s[1].replace(',', '')) for s in later):,}" if later else "-"
mfus = [float(s[2]) for s in later if s[2]]
add("pretrain_1b", "pretrain/fsdp, 1B full, bf16", text, per_gpu, f"{statistics.median(mfus):.1f}%" if mfus else "-",
    "median of steps 2+")
add("qlora_8b", "sft/qlora, 8B NF4 + LoRA", read("qlora_8b"))
peers = read("peers_sft_8b") or ""
table = re.findall(r"^\| (\w+) \([^)]*\) \| ([\d,]+) \| ([\d,]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.nai]+) \| ([\d.]+)x \|$",
                   peers, re.M)
for name, tok_s, step_ms, mem, useful, loss, ratio in table:
    rows.append((f"  peers: {name}", "bench/peers.py --family sft", "-", tok_s, "-", "-", mem,
                 f"ours/this {ratio}x, useful tokens {useful}"))
add("gptq_lora_8b", "sft/peft-int4, 8B GPTQ int4 + LoRA", read("gptq_lora_8b"))
add("fullft_offload_8b", "sft/full-ft-deepspeed-offload, ZeRO-2", read("fullft_offload_8b"))
text = read("qlora_65b_memory")
est = re.search(r"^65B\s+sft\|cls/qlora.*?([\d.]+)G\s+\d+G$", text or "", re.M)
estimate = f"estimate (bench/memory_estimate.py) {est[1]} GB" if est else ""
add("qlora_65b_memory", "QLoRA 65B, batch 1, checkpointing", text, note=estimate, fallback=f"; {estimate}" if est else "")
head = ("measurement", "what", "steps", "tok/s", "tok/s/GPU", "MFU", "peak GPU GB", "note")
print("| " + " | ".join(head) + " |")
print("|---|---|---:|---:|---:|---:|---:|---|")
for r in rows:
    print("| " + " | ".join(str(x) for x in r) + " |")
PY

# ---- running: every command echoed, its output to the terminal and to $OUT/<name>.log

show() { printf '%q ' "$@"; }

# step NAME COMMAND...: run COMMAND with its output to $OUT/NAME.log too; a failure is reported, not fatal
step() {
  local name=$1; shift
  if [[ $DRY == 1 ]]; then
    echo "  [$name] $(show "$@")> $OUT/$name.log"
    return 0
  fi
  echo "== [$name] $(show "$@")"
  { echo "# $(date -u +%FT%TZ) $(show "$@")"; } > "$OUT/$name.log"
  if ! (cd "$REPO" && "$@") 2>&1 | tee -a "$OUT/$name.log"; then
    echo "== [$name] FAILED (log: $OUT/$name.log)"
    return 1
  fi
}

# once NAME PATH COMMAND...: step, unless PATH already exists (models and data are made once and reused)
once() {
  local name=$1 path=$2; shift 2
  if [[ $DRY == 1 ]]; then
    echo "  [$name] (only if $path is missing) $(show "$@")> $OUT/$name.log"
  elif [[ -e "$path" ]]; then
    echo "== [$name] $path exists: reused"
  else
    step "$name" "$@"
  fi
}

snippet() { echo "$OUT/snippets/$1.py"; }

# after a recipe run: drop its final/ checkpoint (GBs at 8B) unless KEEP=1
tidy() { [[ $DRY == 1 || $KEEP == 1 ]] || rm -rf "$OUT/runs/$1/final"; }

if [[ $DRY == 1 ]]; then
  echo "bench/gpu.sh --dry-run: the commands it would run (OUT=$OUT, ONLY=$ONLY, STEPS=$STEPS, SEQ=$SEQ)"
else
  mkdir -p "$OUT/snippets" "$OUT/runs" "$OUT/models" "$OUT/data"
  printf '%s\n' "$MAKE_MODEL" > "$(snippet make_model)"
  printf '%s\n' "$MAKE_LONG_SFT" > "$(snippet make_long_sft)"
  printf '%s\n' "$HOST_RAM_CHECK" > "$(snippet host_ram_check)"
  printf '%s\n' "$QLORA_MEMORY" > "$(snippet qlora_memory)"
  printf '%s\n' "$SUMMARY" > "$(snippet summary)"
  { date -u +%FT%TZ; nvidia-smi || true; "$PYTHON" -c "import torch, transformers, peft, bitsandbytes, deepspeed
print('torch', torch.__version__, 'cuda', torch.version.cuda, '| transformers', transformers.__version__, '| peft',
      peft.__version__, '| bitsandbytes', bitsandbytes.__version__, '| deepspeed', deepspeed.__version__)" || true
    free -g || true; } > "$OUT/env.log" 2>&1
fi

RUN_OPTS=(--report_to=none --overwrite --log_every=1 --max_steps="$STEPS")
SFT_OPTS=(--data_path="$LONG_SFT" --eval_data_path= --max_seq_len="$SEQ" --batch_size="$BATCH_8B" --grad_accum=1
          --gradient_checkpointing=true)
fresh() { [[ $DRY == 1 ]] || rm -rf "$OUT/runs/$1"; echo "$OUT/runs/$1"; }

if wanted pretrain_1b; then
  echo "1 pretrain_1b: full training of a random-init 1B, bf16, sequence $SEQ, pretrain/fsdp on $NGPU GPU(s)"
  step pretrain_1b bash pretrain/fsdp/run.sh --model_config=1b --seq_len="$SEQ" --batch_size="$BATCH_1B" \
    --grad_accum=1 --num_workers=4 --output_dir="$(fresh pretrain_1b)" "${RUN_OPTS[@]}" "${EXTRA[@]+"${EXTRA[@]}"}" || true
  tidy pretrain_1b
fi

if wanted qlora_8b || wanted gptq_lora_8b || wanted fullft_offload_8b; then
  once make_model_8b "$MODEL_8B" "$PYTHON" "$(snippet make_model)" "$CONFIG_8B" "$MODEL_8B" || true
  once make_long_sft "$LONG_SFT" "$PYTHON" "$(snippet make_long_sft)" "$SEQ" "$SFT_EXAMPLES" "$LONG_SFT" || true
fi

if wanted qlora_8b; then
  echo "2 qlora_8b: sft/qlora on the random 8B, sequence $SEQ, batch $BATCH_8B; then bench/peers.py --family sft"
  step qlora_8b bash sft/qlora/run.sh --model_path="$MODEL_8B" "${SFT_OPTS[@]}" \
    --output_dir="$(fresh qlora_8b)" "${RUN_OPTS[@]}" "${EXTRA[@]+"${EXTRA[@]}"}" || true
  tidy qlora_8b
  step peers_sft_8b "$PYTHON" bench/peers.py --family=sft --model_path="$MODEL_8B" --data_path="$LONG_SFT" \
    --max_seq_len="$SEQ" --batch_size="$BATCH_8B" --steps="$STEPS" --rounds="$ROUNDS" --gradient_checkpointing=true \
    --json="$OUT/peers_sft_8b.json" || true
fi

if wanted gptq_lora_8b; then
  echo "3 gptq_lora_8b: GPTQ int4 of the random 8B, then sft/peft-int4, sequence $SEQ, batch $BATCH_8B"
  once quantize_gptq_8b "$GPTQ_8B" "$PYTHON" data_scripts/quantize_gptq.py --model_path="$MODEL_8B" \
    --out_dir="$GPTQ_8B" --n_samples="$GPTQ_SAMPLES" --seq_len=512 || true
  step gptq_lora_8b bash sft/peft-int4/run.sh --model_path="$GPTQ_8B" "${SFT_OPTS[@]}" \
    --output_dir="$(fresh gptq_lora_8b)" "${RUN_OPTS[@]}" "${EXTRA[@]+"${EXTRA[@]}"}" || true
  tidy gptq_lora_8b
fi

if wanted fullft_offload_8b; then
  echo "4 fullft_offload_8b: full fine-tune of $MODEL_FULLFT under ZeRO-2 with the optimizer offloaded to CPU"
  if [[ $DRY == 1 ]]; then
    echo "  [fullft_offload_8b] (skipped unless FORCE=1 or this says the host RAM suffices:" \
      "$(show "$PYTHON" "$(snippet host_ram_check)" "$MODEL_FULLFT"))"
    ram_ok=1
  else
    ram=$(cd "$REPO" && "$PYTHON" "$(snippet host_ram_check)" "$MODEL_FULLFT" 2>&1) && ram_ok=1 || ram_ok=0
    echo "$ram"
  fi
  if [[ $ram_ok == 1 || $FORCE == 1 ]]; then
    step fullft_offload_8b bash sft/full-ft-deepspeed-offload/run.sh --model_path="$MODEL_FULLFT" "${SFT_OPTS[@]}" \
      --zero_stage=2 --offload_optimizer=true --output_dir="$(fresh fullft_offload_8b)" "${RUN_OPTS[@]}" \
      "${EXTRA[@]+"${EXTRA[@]}"}" || true
    tidy fullft_offload_8b
  else
    echo "SKIPPED: too little host RAM ($(echo "$ram" | tail -1)); FORCE=1 tries anyway" | tee "$OUT/fullft_offload_8b.log"
  fi
fi

if wanted qlora_65b_memory; then
  echo "5 qlora_65b_memory: QLoRA peak GPU memory at 65B, sequence $SEQ, batch 1, gradient checkpointing"
  step qlora_65b_memory "$PYTHON" "$(snippet qlora_memory)" "$CONFIG_65B" "$SEQ" "$STEPS_65B" || true
  if [[ $DRY == 1 ]]; then
    echo "  [qlora_65b_memory] $(show "$PYTHON" bench/memory_estimate.py --seq="$SEQ" --batch=1)>> $OUT/qlora_65b_memory.log"
  else
    (cd "$REPO" && "$PYTHON" bench/memory_estimate.py --seq="$SEQ" --batch=1) 2>&1 | tee -a "$OUT/qlora_65b_memory.log" || true
  fi
fi

if [[ $DRY == 1 ]]; then
  echo "  [summary] $(show "$PYTHON" "$(snippet summary)" "$OUT")"
  exit 0
fi
echo
echo "Summary (logs in $OUT):"
(cd "$REPO" && "$PYTHON" "$(snippet summary)" "$OUT") | tee "$OUT/summary.md"
