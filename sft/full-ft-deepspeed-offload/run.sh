#!/usr/bin/env bash
# Full-parameter SFT under DeepSpeed ZeRO-2, optimizer offloaded to CPU. With no arguments: the tiny random-init
# Llama on the bundled sample data, on CPU, in about a minute (plus 60-90 s once, to compile DeepSpeedCPUAdam).
# One GPU:        bash run.sh --model_path=/models/Llama-2-7b-hf --data_path=train.jsonl --eval_data_path=eval.jsonl
# N GPUs:         NGPU=8 bash run.sh ...
# Several nodes:  HOSTFILE=hostfile bash run.sh ...   (hostfile lines: "node0 slots=8"; passwordless ssh, shared disk)
# Large models:   bash run.sh --zero_stage=3 --offload_params ...
# Any Config field can be set as --key=value; `bash run.sh --help` lists them.
set -euo pipefail
# relative paths in the arguments stay relative to where you are: no cd
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export PYTHONPATH="$(cd "$HERE/../.." && pwd)${PYTHONPATH:+:$PYTHONPATH}"
# DeepSpeedCPUAdam is compiled with gcc on first use; keep the build so a machine pays for it once
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/torch_extensions}

NGPU=${NGPU:-1}
HOSTFILE=${HOSTFILE:-}
MASTER_PORT=${MASTER_PORT:-29527}
# --no_local_rank: the rank comes in the environment, not as a --local_rank argument Config would reject
LAUNCH=(deepspeed --no_local_rank --master_port="$MASTER_PORT" ${MASTER_ADDR:+--master_addr="$MASTER_ADDR"})

if [[ -n "$HOSTFILE" ]]; then
  exec "${LAUNCH[@]}" --hostfile="$HOSTFILE" "$HERE/train.py" "$@"
fi
if [[ "$NGPU" -gt 1 ]]; then
  exec "${LAUNCH[@]}" --num_gpus="$NGPU" "$HERE/train.py" "$@"
fi
exec python "$HERE/train.py" "$@"
