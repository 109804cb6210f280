#!/usr/bin/env bash
# GRPO with QLoRA. With no arguments: the tiny random-init Llama on the bundled reversal prompts, on CPU, in about a minute.
# Real run on a GPU:   bash run.sh --model_path=/models/Llama-2-7b-hf --init_adapter=sft/qlora/out/final --data_path=prompts.jsonl --reward_fn=rewards.py:score
# N GPUs (DDP):        NGPU=8 bash run.sh ...
# Several nodes:       NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 NGPU=8 bash run.sh ...   (then NODE_RANK=1 on node1)
# Any Config field can be set as --key=value; `bash run.sh --help` lists them.
set -euo pipefail
# relative paths in the arguments stay relative to where you are: no cd
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export PYTHONPATH="$(cd "$HERE/../.." && pwd)${PYTHONPATH:+:$PYTHONPATH}"

# one CPU thread per process unless told otherwise (torchrun does the same for each rank): sampling is many small
# steps, and on CPU a second thread mostly waits; on a busy 2-core machine it made the default run 13x slower
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

NGPU=${NGPU:-1}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29523}

if [[ "$NGPU" -gt 1 || "$NNODES" -gt 1 ]]; then
  exec torchrun --nproc_per_node="$NGPU" --nnodes="$NNODES" --node_rank="$NODE_RANK" \
    --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" "$HERE/train.py" "$@"
fi
exec python "$HERE/train.py" "$@"
