#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the main job. Extra arguments go to the `spear` command.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
if [ "$#" -eq 0 ]; then set -- train --preset quickstart; fi
spear "$@"
