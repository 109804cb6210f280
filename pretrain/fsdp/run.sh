#!/usr/bin/env bash
# Pretraining with FSDP2 (fully_shard) under torchrun. With no arguments: the tiny config from random init on the
# bundled corpus (data/pretrain/shards), on CPU, in about a minute.
# One GPU:            bash run.sh --model_config=1b --tokenizer_path=/tok --data_path=/data/tokens.bin --seq_len=2048
# N GPUs:             NGPU=8 bash run.sh ...
# Several nodes:       NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 NGPU=8 bash run.sh ...   (then NODE_RANK=1 on node1)
# Any Config field can be set as --key=value; `bash run.sh --help` lists them.
set -euo pipefail
# relative paths in the arguments stay relative to where you are: no cd
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export PYTHONPATH="$(cd "$HERE/../.." && pwd)${PYTHONPATH:+:$PYTHONPATH}"

NGPU=${NGPU:-1}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29557}

if [[ "$NGPU" -gt 1 || "$NNODES" -gt 1 ]]; then
  exec torchrun --nproc_per_node="$NGPU" --nnodes="$NNODES" --node_rank="$NODE_RANK" \
    --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" "$HERE/train.py" "$@"
fi
exec python "$HERE/train.py" "$@"
