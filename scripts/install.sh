#!/bin/sh
# Create the virtualenv and install smolcluster (editable) with its dev tools.
#
# PyTorch: a local wheel wins when pip can find one without an index (e.g. a CPU
# wheel in PIP_FIND_LINKS, as on our CI machines); otherwise pip takes the
# platform's default build from PyPI (CUDA on Linux, MPS-enabled on macOS). Set
# TORCH_INDEX=https://download.pytorch.org/whl/cpu for a small CPU-only Linux build.
set -eu
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
PIP="$VENV/bin/python -m pip"

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
$PIP install -q --upgrade pip
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if [ -n "${TORCH_INDEX:-}" ]; then
    $PIP install -q torch --index-url "$TORCH_INDEX"
  elif $PIP install -q --no-index --no-deps torch 2>/dev/null; then
    # a local wheel: now let pip add torch's own dependencies for exactly that version
    $PIP install -q "torch==$("$VENV/bin/python" -m pip show torch | sed -n 's/^Version: //p')"
  else
    $PIP install -q torch
  fi
fi
$PIP install -q -e ".[dev]"
"$VENV/bin/python" -c "import torch, smolcluster; print(f'smolcluster {smolcluster.__version__} with torch {torch.__version__} in $VENV')"
