#!/usr/bin/env bash
# Create .venv with the verified stack: torch pinned first (a looser spec can pull a multi-GB CUDA build on a
# CPU machine), then the runtime and dev requirements. Safe to run again. Use: bash setup.sh && . .venv/bin/activate
# TORCH_SPEC overrides the torch to install (e.g. TORCH_SPEC=torch==2.13.0 with a CUDA index on a GPU machine).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
PYTHON=${PYTHON:-python3}
[[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check "${TORCH_SPEC:-torch==2.13.0}"
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt -r requirements-dev.txt
.venv/bin/python -c "import torch, transformers, peft, bitsandbytes; print(f'ready: torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, bitsandbytes {bitsandbytes.__version__}')"
