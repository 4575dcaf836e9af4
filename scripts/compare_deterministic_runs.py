"""Compare the metrics of two ``scripts/deterministic_run.sh`` folders, timings excluded: a refactoring that
changes no behaviour prints IDENTICAL (exit 0); otherwise the differing keys (exit 1).

    python scripts/compare_deterministic_runs.py <before> <after>
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

PRESETS = ("spear", "gigpo-spear", "spear-replay", "spear-sft")
TIMING_PREFIXES = ("time/", "perf/", "share/")


def load(path: Path) -> list[dict]:
    return [
        {k: v for k, v in json.loads(line).items() if not k.startswith(TIMING_PREFIXES)}
        for line in path.read_text().splitlines()
    ]


def main(before: str, after: str) -> int:
    differing = 0
    for preset in PRESETS:
        a, b = load(Path(before) / preset / "metrics.jsonl"), load(Path(after) / preset / "metrics.jsonl")
        if len(a) != len(b):
            print(f"{preset}: {len(a)} records before, {len(b)} after")
            differing += 1
        for ra, rb in zip(a, b):
            diff = {k: (ra.get(k), rb.get(k)) for k in ra.keys() | rb.keys() if ra.get(k) != rb.get(k)}
            if diff:
                differing += 1
                print(f"{preset} step {ra.get('step')}: {diff}")
        print(f"{preset}: {len(a)} records, {sum(len(r) for r in a)} values compared")
    print("IDENTICAL" if differing == 0 else f"{differing} records differ")
    return 0 if differing == 0 else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
