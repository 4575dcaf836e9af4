#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite: lint, then pytest. Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
ruff check .
python -m pytest -q "$@"
