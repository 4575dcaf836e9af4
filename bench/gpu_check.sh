#!/usr/bin/env bash
# GPU check: spear_kernels (interpreter test-suite, CUDA correctness vs the oracles, timing), then the
# trainer end to end on the GPU (three steps of the spear preset, HF and, if it imports, vLLM).
# Run from the repository root on the GPU machine (torch + triton there, no network):
#   pip install --no-deps --no-build-isolation -e .   # once
#   OUT=/some/dir bash bench/gpu_check.sh
# Logs go to $OUT; the short table is printed last. Liger-Kernel is optional: a pure-Python wheel in
# bench/wheels/ is installed with --no-deps if present.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
status=0

for whl in bench/wheels/liger_kernel-*.whl; do
  [ -e "$whl" ] && python -m pip install --no-deps --no-index -q "$whl" >"$OUT/pip_liger.log" 2>&1 \
    && echo "installed $(basename "$whl")" || true
done
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())" | tee "$OUT/env.log"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >>"$OUT/env.log" 2>&1 || true

echo "== 1/4 interpreter test-suite (CPU tensors, TRITON_INTERPRET=1)"
TRITON_INTERPRET=1 timeout 900 python -m pytest -q -p no:cacheprovider tests/kernels >"$OUT/pytest.log" 2>&1
rc=$?; tail -n 3 "$OUT/pytest.log"; [ $rc -eq 0 ] || status=1

echo "== 2/4 CUDA correctness vs oracles (kernels; packed and shared-prefix attention vs padded rows)"
TRITON_INTERPRET=0 timeout 900 python bench/gpu_bench.py --check >"$OUT/check.log" 2>&1
rc=$?; grep -E "FAIL|check:" "$OUT/check.log"; [ $rc -eq 0 ] || status=1
TRITON_INTERPRET=0 timeout 300 python -m pytest -q -p no:cacheprovider tests/train/test_packed_sequences.py -k cuda \
  >"$OUT/packed_cuda.log" 2>&1
rc=$?; tail -n 2 "$OUT/packed_cuda.log"; [ $rc -eq 0 ] || status=1

echo "== 3/4 timing (bf16)"
TRITON_INTERPRET=0 timeout 1800 python bench/gpu_bench.py --out "$OUT" ${GPU_BENCH_ARGS:-} >"$OUT/bench.log" 2>&1 || status=1
tail -n 5 "$OUT/bench.log" | grep -v "^|" || true

echo "== 4/4 trainer end to end (3 steps of the spear preset on the GPU)"
TRITON_INTERPRET=0 timeout 900 python bench/gpu_e2e.py --out "$OUT" ${GPU_E2E_ARGS:-} >"$OUT/e2e.log" 2>&1 || status=1
echo
cat "$OUT/gpu_bench.md" 2>/dev/null || echo "(no table: see $OUT/bench.log)"
cat "$OUT/gpu_e2e.md" 2>/dev/null || echo "(no end-to-end table: see $OUT/e2e.log)"
exit $status
