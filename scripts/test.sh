#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite on CPU. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
# .venv-vllm (the vLLM backend's tests run for real; they skip without it) installs beside .venv: mostly downloads
vllm_log=$(mktemp)
bash scripts/setup_vllm.sh > "$vllm_log" 2>&1 &
vllm_setup=$!
bash scripts/setup.sh
wait "$vllm_setup" || { cat "$vllm_log"; echo "scripts/setup_vllm.sh failed"; exit 1; }
cat "$vllm_log" && rm -f "$vllm_log"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/ruff check align tests scripts benchmarks
.venv/bin/ruff format --check align tests scripts benchmarks
.venv/bin/python -m pytest -q -ra "$@"
