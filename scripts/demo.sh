#!/usr/bin/env bash
# Set up (if needed) and run the embedded demo on CPU: build the tiny zoo, assemble a model, inspect it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/align zoo --out checkpoints/zoo
.venv/bin/align assemble recipes/tiny/assemble_siglip_qwen2.yaml output_dir=checkpoints/demo/assembled
.venv/bin/align inspect checkpoints/demo/assembled
