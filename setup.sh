#!/usr/bin/env bash
# Create .venv with the verified stack: torch pinned first (a looser spec can pull a multi-GB CUDA build on a
# CPU machine), then the runtime and dev requirements. Safe to run again. Use: bash setup.sh && . .venv/bin/activate
# TORCH_SPEC overrides the torch to install (e.g. TORCH_SPEC=torch==2.13.0 with a CUDA index on a GPU machine).
# `bash setup.sh --check` runs only the last step: import the stack in .venv and print its versions.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
PYTHON=${PYTHON:-python3}
case "${1:-}" in
  "") [[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
      .venv/bin/python -m pip install -q --disable-pip-version-check "${TORCH_SPEC:-torch==2.13.0}"
      .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt -r requirements-dev.txt ;;
  --check) ;;
  *) echo "setup.sh: unknown argument $1; expected none or --check" >&2; exit 2 ;;
esac
# the recipes' own quieting first (common/logs.py), so the check shows what a run shows: no import-time notices
.venv/bin/python -c "from common.logs import quiet_third_party_logs; quiet_third_party_logs()
import torch, transformers, peft, bitsandbytes
print(f'ready: torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, bitsandbytes {bitsandbytes.__version__}')"
