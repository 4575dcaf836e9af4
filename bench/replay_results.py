"""Turn the pytest-benchmark JSON of bench/bench_replay_index.py into the markdown table of RESULTS.md.

    python bench/replay_results.py /tmp/replay_index.json

Medians per operation and size, C++ against the numpy oracle (speed-up = oracle / C++), and the
insert of 2048 x 512 tokens against a bare numpy memcpy of the same bytes.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict


def human(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def speedup_text(ratio: float) -> str:
    return f"{ratio:,.0f}x" if ratio >= 10 else f"{ratio:.1f}x"


def load(path: str) -> tuple[dict, dict]:
    with open(path) as f:
        report = json.load(f)
    medians: dict[tuple[str, int], dict[str, float]] = defaultdict(dict)
    extras: dict[tuple[str, int], dict] = defaultdict(dict)
    for bench in report["benchmarks"]:
        info = bench["extra_info"]
        key = (info["op"], info["rows"])
        medians[key][info["impl"]] = bench["stats"]["median"]
        for name, value in info.items():
            if name == "bit_exact":  # must hold for every implementation
                extras[key][name] = extras[key].get(name, True) and value
            elif name not in ("op", "rows", "impl"):
                extras[key][name] = value
    return medians, extras


def comparison_table(medians: dict, extras: dict, big_op: str) -> list[str]:
    lines = [
        "| operation | rows | C++ median | oracle median | speed-up |",
        "|---|---:|---:|---:|---:|",
    ]
    for op, rows in sorted((k for k in medians if k[0] != big_op), key=lambda k: (k[0], k[1])):
        times = medians[(op, rows)]
        cpp, oracle = times.get("cpp"), times.get("oracle")
        speedup = speedup_text(oracle / cpp) if cpp and oracle else "-"
        note = ""
        if "bit_exact" in extras[(op, rows)]:
            info = extras[(op, rows)]
            note = f" ({info['bytes'] / 1e6:.1f} MB, bit-exact: {'yes' if info['bit_exact'] else 'NO'})"
        cells = [human(cpp) if cpp else "-", human(oracle) if oracle else "-"]
        lines.append(f"| {op}{note} | {rows:,} | {cells[0]} | {cells[1]} | {speedup} |")
    return lines


def memcpy_table(medians: dict, big_op: str) -> list[str]:
    (times,) = [v for k, v in medians.items() if k[0] == big_op]
    memcpy = times["memcpy"]
    lines = [
        f"| {big_op} | median | / memcpy |",
        "|---|---:|---:|",
        f"| bare numpy memcpy (np.copyto of the same bytes into preallocated arrays) | {human(memcpy)} | 1.00 |",
    ]
    labels = {
        "cpp": "C++ insert_batch into a flushed index (segment reused)",
        "cpp-new-index": "C++ insert_batch into a new index (fresh segment)",
        "oracle": "numpy oracle insert_batch into a flushed index",
    }
    for impl, label in labels.items():
        if impl in times:
            lines.append(f"| {label} | {human(times[impl])} | {times[impl] / memcpy:.2f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", help="pytest-benchmark --benchmark-json output")
    args = parser.parse_args()
    medians, extras = load(args.json)
    big_op = next(op for op, _ in medians if op.startswith("insert 2048"))
    print("\n".join(comparison_table(medians, extras, big_op)))
    print()
    print("\n".join(memcpy_table(medians, big_op)))


if __name__ == "__main__":
    main()
