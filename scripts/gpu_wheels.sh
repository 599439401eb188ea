#!/usr/bin/env bash
# Wheels of the packages a lent GPU machine lacks, at the versions this project's .venv runs, into wheels/
# (git-ignored; carry it with the tree, scripts/gpu_check.sh installs it with --no-deps there).
# That machine's image (/work/.library/device/KINDS.md) has Python 3.12, torch, transformers 5.17, peft, timm,
# accelerate, numpy, pyarrow, ... but no deepspeed, trl, open_clip, math-verify or datasets; transformers and
# huggingface_hub are carried too, so both machines run the same versions. Usage: scripts/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
[ -x "$PY" ] || { echo "gpu_wheels: run scripts/setup.sh first (versions come from .venv)"; exit 2; }
PACKAGES=(deepspeed trl open_clip_torch math-verify latex2sympy2_extended antlr4-python3-runtime datasets dill
  multiprocess hjson pydantic pydantic_core annotated-types typing-inspection ftfy wcwidth transformers
  huggingface_hub tokenizers accelerate peft safetensors)
pins=()
for name in "${PACKAGES[@]}"; do
  pins+=("$("$PY" -m pip freeze | grep -i -E "^${name//[-_]/[-_]}==" | head -1)")
done
rm -rf wheels && mkdir -p wheels
pure=() compiled=()
for pin in "${pins[@]}"; do
  case "$pin" in deepspeed==*) ;; pydantic_core==*|tokenizers==*|safetensors==*|multiprocess==*) compiled+=("$pin") ;; *) pure+=("$pin") ;; esac
done
"$PY" -m pip download -q --no-deps -d wheels "${pure[@]}"
# compiled (or per-Python) wheels for the GPU machine's Python 3.12, not this one's
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d wheels "${compiled[@]}"
# DeepSpeed ships as a source archive: build a pure-Python wheel (its ops compile at run time, JIT)
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w wheels "$(printf '%s\n' "${pins[@]}" | grep '^deepspeed==')"
rm -f wheels/*.tar.gz
du -sh wheels && ls wheels
