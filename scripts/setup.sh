#!/usr/bin/env bash
# Create .venv (if missing) and install align with its dev tools. Idempotent: re-installs only when
# pyproject.toml changed. Usage: scripts/setup.sh   (sourced by scripts/demo.sh and scripts/test.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
  .venv/bin/pip install -q --upgrade pip
fi
stamp=.venv/.align-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  # torch + torchvision that import together on CPU machines (open_clip needs torchvision).
  if [ "$(uname -m)" = "x86_64" ]; then
    .venv/bin/pip install -q "torch==2.14.1" "torchvision==0.29.1"
  else
    .venv/bin/pip install -q "torch==2.9.1" "torchvision==0.24.1"
  fi
  .venv/bin/pip install -q -e ".[dev]"
  echo "$want" > "$stamp"
fi
