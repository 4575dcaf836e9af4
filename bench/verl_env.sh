#!/usr/bin/env bash
# Create the virtual environment that tests/kernels/test_verl_registry.py runs verl 0.9.1 in (default
# bench/.venv-verl, git-ignored; another path as the first argument or $SPEAR_VERL_VENV). Idempotent: a
# second run only checks the imports.
#
# verl's own requirements (ray[default], vLLM / FSDP extras, transformers<5.11, numpy>=2) clash with the
# project's environment and pull GPU stacks, so verl is installed with --no-deps next to exactly what
# `import verl` and `verl.trainer.ppo.core_algos` (its policy-loss registry) import: numpy, packaging,
# omegaconf, tensordict, codetiming, ray (verl.protocol imports it) and transformers (within verl's range).
# verl.workers.utils.losses (the actor's ppo_loss, the registry's call site) also reaches verl's RL dataset
# classes (datasets, pillow) through the verl.utils.dataset package __init__; they are left out, and the
# test's child enters that package without its __init__ (tests/kernels/verl_child.py, _import_ppo_loss).
# torch 2.13.0 CPU is installed first and alone, and stays pinned in every later pip call (never an
# unpinned torch: that pulls a multi-GB CUDA build; off the project machines set
# SPEAR_TORCH_INDEX=https://download.pytorch.org/whl/cpu). spear_kernels is not installed here: the test
# puts the working tree's kernels/ on PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-${SPEAR_VERL_VENV:-bench/.venv-verl}}
# shellcheck source=bench/side_venv.sh
source bench/side_venv.sh  # the venv, `pip`, torch 2.13.0 CPU
deps=(torch==2.13.0 "numpy>=2.0,<2.4" packaging omegaconf==2.4.0 tensordict==0.10.0 codetiming==1.4.0 ray==2.60.0
      transformers==5.10.4)
check="import verl, verl.trainer.ppo.core_algos, verl.workers.config, sys; sys.exit(0 if verl.__version__ == '0.9.1' else 1)"
if ! "$VENV/bin/python" -c "$check" 2>/dev/null; then
  "${pip[@]}" --no-deps verl==0.9.1
  "${pip[@]}" "${deps[@]}" 2>&1 | { grep -v "^verl 0.9.1 requires\|is ignored: it is neither\|dependency conflicts" || true; }
fi
"$VENV/bin/python" -c "import torch, verl, verl.workers.config, verl.trainer.ppo.core_algos as c; assert torch.__version__.startswith('2.13.0'), torch.__version__; print('verl venv:', '$VENV', '| verl', verl.__version__, '| torch', torch.__version__, '| policy losses:', len(c.POLICY_LOSS_REGISTRY))"
