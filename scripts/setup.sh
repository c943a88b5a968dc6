#!/usr/bin/env bash
# Create ./.venv and install the toolkit with what it needs (idempotent).
#   TORCH_SPEC  pip requirement for torch (default torch==2.13.0; on a CUDA machine the same
#               requirement from PyPI is the CUDA build; use e.g. TORCH_SPEC="torch==2.13.0 --index-url
#               https://download.pytorch.org/whl/cu128" to pick a specific CUDA build)
#   PYTHON      interpreter to create the venv with (default python3, needs >= 3.10)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.installed
want="$(cat pyproject.toml | sha256sum | cut -d' ' -f1) $TORCH_SPEC"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    # shellcheck disable=SC2086
    .venv/bin/python -m pip install -q $TORCH_SPEC
  fi
  .venv/bin/python -m pip install -q -e ".[torch,test]"
  # optional: ONNX export (tests compare the graph with onnxruntime); without it ONNX export is skipped
  .venv/bin/python -m pip install -q -e ".[onnx]" || echo "notice: the onnx extra could not be installed; ONNX export and its tests are skipped"
  echo "$want" > "$stamp"
fi
