#!/usr/bin/env bash
# Install the reference kernels that bench/kernel_bench.py compares against into bench/.kernel-refs
# (git-ignored; another folder as the first argument or $SPEAR_KERNEL_REFS), next to the project's own
# torch: liger-kernel, cut-cross-entropy and verl, each pinned and with --no-deps, so pip can never pull
# another torch (an unpinned torch is a multi-GB CUDA build). All three are pure Python on top of torch
# and triton, which .venv already has. kernel_bench.py puts the folder on sys.path itself; nothing is
# installed into .venv. verl's full import needs ray, tensordict, omegaconf ...: the bench loads only its
# kernel module, verl/utils/kernel/linear_cross_entropy.py, by path (see kernel_variants.load_verl_lce).
# Idempotent: a second run only checks the versions.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-${SPEAR_KERNEL_REFS:-bench/.kernel-refs}}
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export PIP_DISABLE_PIP_VERSION_CHECK=1
want=(liger-kernel==0.8.5 cut-cross-entropy==25.1.1 verl==0.9.1)
have() { # every wanted dist-info present in $DEST
  for w in "${want[@]}"; do
    n=${w%%==*}; v=${w##*==}
    ls -d "$DEST/${n//-/_}-$v.dist-info" >/dev/null 2>&1 || return 1
  done
}
if ! have; then
  "$PY" -m pip install -q --no-compile --no-deps --upgrade --target "$DEST" "${want[@]}"
fi
echo "kernel references in $DEST: ${want[*]}"
