#!/usr/bin/env bash
# LoRA sequence classification / regression on a GPTQ int4 base. With no arguments: the tiny random-init Llama,
# quantized to GPTQ int4 once and cached, on the bundled 3-way sentiment data, on CPU, in about a minute.
# Real run on a GPU:   python ../../data_scripts/quantize_gptq.py --model_path=/models/Llama-2-7b-hf --out_dir=/models/Llama-2-7b-gptq-int4
#                      bash run.sh --model_path=/models/Llama-2-7b-gptq-int4 --data_path=train.jsonl --eval_data_path=eval.jsonl
# N GPUs (DDP):        NGPU=8 bash run.sh ...
# Several nodes:       NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 NGPU=8 bash run.sh ...   (then NODE_RANK=1 on node1)
# Any Config field can be set as --key=value; `bash run.sh --help` lists them.
set -euo pipefail
# relative paths in the arguments stay relative to where you are: no cd
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export PYTHONPATH="$(cd "$HERE/../.." && pwd)${PYTHONPATH:+:$PYTHONPATH}"
# JIT-built kernels are kept, so a machine compiles them once (gptqmodel's own go to ~/.cache/gptqmodel)
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/torch_extensions}

NGPU=${NGPU:-1}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29539}

if [[ "$NGPU" -gt 1 || "$NNODES" -gt 1 ]]; then
  exec torchrun --nproc_per_node="$NGPU" --nnodes="$NNODES" --node_rank="$NODE_RANK" \
    --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" "$HERE/train.py" "$@"
fi
exec python "$HERE/train.py" "$@"
