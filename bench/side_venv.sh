# Sourced by bench/trl_env.sh and bench/verl_env.sh: the part every side venv shares. Given VENV, it makes
# the venv if missing, defines `pip` (an array: quiet pip install in that venv) and installs torch 2.13.0
# CPU first and alone unless the venv already has it (never an unpinned torch: that pulls a multi-GB CUDA
# build; off the project machines set SPEAR_TORCH_INDEX=https://download.pytorch.org/whl/cpu).
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip=("$VENV/bin/python" -m pip install -q)
torch_args=()
if [ -n "${SPEAR_TORCH_INDEX:-}" ]; then torch_args=(--index-url "$SPEAR_TORCH_INDEX"); fi
"$VENV/bin/python" -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null \
  || "${pip[@]}" "${torch_args[@]}" torch==2.13.0
