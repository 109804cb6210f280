#!/usr/bin/env bash
# Pretraining under DeepSpeed (ZeRO-1 by default). With no arguments: the tiny config from random init on the bundled
# corpus (data/pretrain/shards), on CPU, in about a minute.
# One GPU:        bash run.sh --model_config=1b --tokenizer_path=/tok --data_path=/data/tokens.bin --seq_len=2048
# N GPUs:         NGPU=8 bash run.sh ...
# Several nodes:  HOSTFILE=hostfile bash run.sh ...   (hostfile lines: "node0 slots=8"; passwordless ssh, shared disk)
# Large models:   bash run.sh --model_config=65b --zero_stage=3 ...
# Any Config field can be set as --key=value; `bash run.sh --help` lists them.
set -euo pipefail
# relative paths in the arguments stay relative to where you are: no cd
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export PYTHONPATH="$(cd "$HERE/../.." && pwd)${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/torch_extensions}

NGPU=${NGPU:-1}
HOSTFILE=${HOSTFILE:-}
MASTER_PORT=${MASTER_PORT:-29547}
# --no_local_rank: the rank comes in the environment, not as a --local_rank argument Config would reject
LAUNCH=(deepspeed --no_local_rank --master_port="$MASTER_PORT" ${MASTER_ADDR:+--master_addr="$MASTER_ADDR"})

if [[ -n "$HOSTFILE" ]]; then
  exec "${LAUNCH[@]}" --hostfile="$HOSTFILE" "$HERE/train.py" "$@"
fi
if [[ "$NGPU" -gt 1 ]]; then
  exec "${LAUNCH[@]}" --num_gpus="$NGPU" "$HERE/train.py" "$@"
fi
exec python "$HERE/train.py" "$@"
