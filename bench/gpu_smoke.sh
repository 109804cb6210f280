#!/usr/bin/env bash
# GPU smoke: the first contact of every recipe with a GPU, and the headline measurements, on one H100 in at most
# 560 s (issue 12). Everything it keeps goes under $OUT (default ./gpu_smoke_out), three files: smoke.log (the
# environment, every step's command and the end of its output), summary.md (one table, a row per step or
# measurement), results.json (the same rows). The runs' own folders, the random 1B and the data go under $SMOKE_WORK
# (default /tmp/gpu_smoke_work), which is not brought back.
#
# NOT RUN ON A GPU YET: written and tested (--dry-run, the Python pieces at tiny scale) on a CPU-only machine.
#
#   a   every recipe's default run on CUDA, tiny model, 4 steps: sft x4, cls x4, pretrain/deepspeed (ZeRO-1 and
#       --zero_stage=3) and pretrain/fsdp: exit code, loss first -> last and peak memory from the run's metrics.jsonl,
#       seconds. A recipe whose package was not carried (deepspeed, bitsandbytes, gptqmodel) is a "not carried" row.
#   a2  tests/common/test_data_padding.py with LLAMA_RECIPES_TEST_DEVICE=cuda (bf16 tolerance): left padding, the
#       sdpa kernels CUDA picks for padded rows, a fully masked pad row, label masks
#   b   a random-init Llama-3.2-1B shape made on the GPU (bf16, saved once), sequence 2,048: bench/peers.py --family
#       sft (sft/qlora vs Trainer + peft, 2 rounds alternating): tok/s, ratio, peak GB allocated / reserved; then
#       pretrain/fsdp full training of it: tok/s and MFU (6 x matmul params + attention term, over 989 and 798 TFLOP/s)
#   c   QLoRA at the Llama-3-8B shape built on the meta device and quantized to NF4 on the GPU layer by layer
#       (bench/gpu_models.py qlora): tok/s and peak memory, sequence 2,048, batch 1, checkpointing on and off, beside
#       tools/estimate_memory.py's figure
#   d   the same at 65B, checkpointing on, against the 2 x 24 GB promise (skipped when the budget is spent)
# The tiny recipe runs, the padding tests and the 1B preparation run in five lanes at once; every step has its own
# time limit (bench/gpu_smoke.py --dry-run lists them) and is killed with its children when it runs over.
#
# Usage:   bash bench/gpu_smoke.sh [--dry-run] [--only=a,a2,b,c,d]
# With the device tool: carry .whl (bench/pack_gpu_wheels.sh builds it) and run, with a limit of about 600 s,
#          bash bench/gpu_smoke.sh
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT=${OUT:-gpu_smoke_out}
[[ "$OUT" = /* ]] || OUT="$PWD/$OUT"
export OUT
export SMOKE_WORK=${SMOKE_WORK:-/tmp/gpu_smoke_work}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1  # nothing can be reached there: never wait on it
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$SMOKE_WORK/torch_extensions}
export LLAMA_RECIPES_CACHE=${LLAMA_RECIPES_CACHE:-$SMOKE_WORK/cache}

for arg in "$@"; do
  case "$arg" in
    -h|--help) sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d'; exit 0 ;;
    --dry-run|--dry_run)
      echo "bench/gpu_smoke.sh --dry-run: wheels from .whl/install.sh or bench/install_gpu_wheels.sh (45 s)," \
        "versions (10 s), then"
      exec "${PYTHON:-python3}" "$REPO/bench/gpu_smoke.py" "$@" ;;
  esac
done

mkdir -p "$OUT" "$SMOKE_WORK"

smoke() {
  # the recipes' run.sh call `python`: where only python3 exists (the GPU machine), a `python` that is it
  if ! command -v python >/dev/null 2>&1; then
    mkdir -p "$SMOKE_WORK/bin"
    ln -sf "$(command -v python3)" "$SMOKE_WORK/bin/python"
    export PATH="$SMOKE_WORK/bin:$PATH"
  fi

  echo "# gpu_smoke $(date -u +%FT%TZ) in $REPO, OUT=$OUT"
  git -C "$REPO" log -1 --format='commit %h %s' 2>/dev/null || true
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || echo "nvidia-smi: none"

  # the packages the GPU machine lacks, from the .whl folder carried along (bench/pack_gpu_wheels.sh builds it): the
  # install script that exists (it installs into python3 and always exits 0), at most 45 s
  WHEELS=""
  for candidate in "$REPO/.whl/install.sh" "$REPO/bench/install_gpu_wheels.sh"; do
    if [[ -z "$WHEELS" && -f "$candidate" ]]; then
      WHEELS=$candidate
    fi
  done
  if [[ -z "$WHEELS" ]]; then
    echo "wheels: none carried"
  else
    echo "wheels: bash $WHEELS"
    PYTHON=python3 timeout 45 bash "$WHEELS" "$REPO/.whl" < /dev/null || echo "wheels: $WHEELS exited $?"
  fi
  timeout 10 python "$REPO/bench/gpu_smoke.py" --versions || echo "versions: exit $?"

  python "$REPO/bench/gpu_smoke.py" --out="$OUT" --work="$SMOKE_WORK" --python="$(command -v python)" "$@"
}

smoke "$@" 2>&1 | tee "$OUT/smoke.log"
