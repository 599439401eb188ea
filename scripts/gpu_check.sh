#!/usr/bin/env bash
# The GPU path, end to end and measured, on one GPU in a few minutes (scripts/gpu_check.py says what runs):
#   scripts/gpu_check.sh [--out DIR]    on a CUDA machine: bf16, real-shaped parts with random weights
#   scripts/gpu_check.sh --tiny         the same phases on the tiny zoo parts; runs on CPU (CI does, via pytest)
# A GPU machine without this project's packages: build them here with scripts/gpu_wheels.sh (into wheels/),
# carry wheels/ with the tree; this script installs them first. Python: .venv when present, else python3.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
if ! "$PY" -c "import deepspeed, trl, open_clip, math_verify, datasets" 2> /dev/null; then
  compgen -G "wheels/*.whl" > /dev/null || { echo "gpu_check: $PY lacks packages; carry wheels/ (scripts/gpu_wheels.sh)"; exit 2; }
  "$PY" -m pip install -q --no-index --no-deps wheels/*.whl
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$PY" scripts/gpu_check.py "$@"
