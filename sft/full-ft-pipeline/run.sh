#!/usr/bin/env bash
# Full fine-tuning in pipeline stages (torch.distributed.pipelining + FSDP2) under torchrun. With no arguments: the
# tiny random-init Llama on the bundled sample data, one process on CPU, in about a minute.
# Two stages:     NGPU=2 bash run.sh --pp=2                         (two processes; on CPU too)
# 8 GPUs:         NGPU=8 bash run.sh --pp=4 --model_path=/models/Llama-2-13b-hf --data_path=train.jsonl --grad_accum=8
# Several nodes:  NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 NGPU=8 bash run.sh --pp=8 ...   (then NODE_RANK=1 on node1)
# Any Config field can be set as --key=value; `bash run.sh --help` lists them.
set -euo pipefail
# relative paths in the arguments stay relative to where you are: no cd
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export PYTHONPATH="$(cd "$HERE/../.." && pwd)${PYTHONPATH:+:$PYTHONPATH}"

NGPU=${NGPU:-1}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29561}

if [[ "$NGPU" -gt 1 || "$NNODES" -gt 1 ]]; then
  exec torchrun --nproc_per_node="$NGPU" --nnodes="$NNODES" --node_rank="$NODE_RANK" \
    --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" "$HERE/train.py" "$@"
fi
exec python "$HERE/train.py" "$@"
