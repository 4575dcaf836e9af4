#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite: lint, then pytest. Exits non-zero on any failure.
#
# Two tests run real TRL and verl, each in a virtual environment of its own (bench/trl_env.sh: TRL 1.16 in
# bench/.venv-trl; bench/verl_env.sh: verl 0.9.1 in bench/.venv-verl; both idempotent). Building them is mostly
# waiting on downloads, so without arguments they build in the background while the main suite runs, and the
# two tests that need them run last. With arguments (a selection of tests) they are built first.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
ruff check .
SIDE_TESTS=(tests/kernels/test_trl_integration.py tests/kernels/test_verl_registry.py)
if [ "$#" -gt 0 ]; then
  bash bench/trl_env.sh
  bash bench/verl_env.sh
  exec python -m pytest -q "$@"
fi
logs=$(mktemp -d)
bash bench/trl_env.sh > "$logs/trl_env.log" 2>&1 &
trl_pid=$!
bash bench/verl_env.sh > "$logs/verl_env.log" 2>&1 &
verl_pid=$!
status=0
python -m pytest -q --durations=20 "${SIDE_TESTS[@]/#/--ignore=}" || status=$?
for side in trl:$trl_pid verl:$verl_pid; do
  if ! wait "${side#*:}"; then
    echo "bench/${side%%:*}_env.sh failed:" >&2
    cat "$logs/${side%%:*}_env.log" >&2
    status=1
  fi
done
python -m pytest -q "${SIDE_TESTS[@]}" || status=$?
exit "$status"
