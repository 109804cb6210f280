#!/usr/bin/env bash
# FSDP + QLoRA SFT under torchrun. With no arguments: the tiny random-init Llama on the bundled sample data, on CPU,
# in under a minute (one process; NGPU=2 shards it over two gloo processes, as the tests do).
# 65B on two 24 GB GPUs:  NGPU=2 bash run.sh --model_path=/models/llama-65b --data_path=train.jsonl --lora_r=8 --max_seq_len=512 --batch_size=1 --grad_accum=16
# 8 GPUs:                 NGPU=8 bash run.sh --model_path=... --data_path=...
# Several nodes:          NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 NGPU=8 bash run.sh ...   (then NODE_RANK=1 on node1)
# Any Config field can be set as --key=value; `bash run.sh --help` lists them.
set -euo pipefail
# relative paths in the arguments stay relative to where you are: no cd
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export PYTHONPATH="$(cd "$HERE/../.." && pwd)${PYTHONPATH:+:$PYTHONPATH}"

NGPU=${NGPU:-1}  # processes per node: one per GPU (or CPU processes where there is no GPU)
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29519}

if [[ "$NGPU" -gt 1 || "$NNODES" -gt 1 ]]; then
  exec torchrun --nproc_per_node="$NGPU" --nnodes="$NNODES" --node_rank="$NODE_RANK" \
    --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" "$HERE/train.py" "$@"
fi
exec python "$HERE/train.py" "$@"
