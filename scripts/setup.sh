#!/usr/bin/env bash
# Create .venv (if missing) and install the pinned CPU stack plus spear_engine (builds the C++ index).
# Idempotent: a second run only re-checks. Torch goes in first and alone, pinned, so that nothing
# later can pull a multi-GB CUDA build (set SPEAR_TORCH_INDEX to a CPU index off the project machines,
# e.g. https://download.pytorch.org/whl/cpu).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
torch_args=()
[ -n "${SPEAR_TORCH_INDEX:-}" ] && torch_args=(--index-url "$SPEAR_TORCH_INDEX")
python -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null \
  || pip install -q "${torch_args[@]}" torch==2.13.0
pip install -q --no-deps triton==3.7.1
pip install -q -r requirements.txt -r requirements-dev.txt setuptools wheel
pip install -q --no-build-isolation -e .
python -c "import torch, spear_engine, spear_engine._replay_index; print('spear_engine', spear_engine.__version__, 'torch', torch.__version__)"
