"""Reading an experiment folder for ``spear compare``: ``runs/<arm>/seed<k>/metrics.jsonl`` into records
merged per step, the arms in ``experiment.yaml`` order, and per-step curves over seeds."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from spear_engine.compare_stats import mean_ci
from spear_engine.machine import machine_spans
from spear_engine.metrics import read_metrics

MACHINE_KEY = "machine"  # the machine label load_runs adds to each training step's record
UNRECORDED_MACHINE = "machine not recorded"

Record = dict[str, Any]
Runs = dict[str, dict[str, list[Record]]]  # arm -> seed -> merged records, one per step


def merge_steps(records: Iterable[Record]) -> list[Record]:
    """One record per step, sorted by step: the keys of records sharing a step merged, the last logged
    value winning (a ``null`` does not erase an earlier value of the same step)."""
    merged: dict[int, Record] = {}
    for record in records:
        if "step" not in record:
            continue
        step = int(record["step"])
        row = merged.setdefault(step, {"step": step})
        for key, value in record.items():
            if key != "step" and (value is not None or key not in row):
                row[key] = value
    return [merged[step] for step in sorted(merged)]


def series(records: Iterable[Record], key: str) -> tuple[list[int], list[float]]:
    """The steps at which ``key`` has a finite number, and those numbers (records merged per step)."""
    steps: list[int] = []
    values: list[float] = []
    for record in merge_steps(records):
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            steps.append(record["step"])
            values.append(float(value))
    return steps, values


def listed_arms(folder: str | Path) -> list[str]:
    """The arms ``experiment.yaml`` names under ``arms:`` (a list, or a mapping keyed by arm), in order;
    empty when there is no such file or key."""
    path = Path(folder) / "experiment.yaml"
    if not path.is_file():
        return []
    import yaml

    arms = (yaml.safe_load(path.read_text()) or {}).get("arms") or []
    if isinstance(arms, dict):
        return [str(arm) for arm in arms]
    names = []
    for arm in arms:
        name = arm.get("name") if isinstance(arm, dict) else arm
        if name is not None:
            names.append(str(name))
    return names


def _seed_order(path: Path) -> tuple[int, str]:
    match = re.fullmatch(r"seed(\d+)", path.name)
    return (int(match.group(1)) if match else 1 << 30, path.name)


def load_runs(folder: str | Path) -> Runs:
    """Every run of an experiment folder: ``{arm: {seed: records}}``, each run's records merged per step
    (:func:`merge_steps`), arms in ``experiment.yaml`` order (the rest sorted after), seeds by number. A
    run without metrics yet is kept with no records. Raises FileNotFoundError when there is no
    ``runs/`` folder or no run logged a metric."""
    root = Path(folder) / "runs"
    if not root.is_dir():
        raise FileNotFoundError(
            f"{root} not found: an experiment folder holds runs/<arm>/seed<k>/metrics.jsonl"
        )
    found: Runs = {}
    for arm_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        seeds = sorted((p for p in arm_dir.iterdir() if p.is_dir()), key=_seed_order)
        if seeds:
            found[arm_dir.name] = {seed.name: with_machines(merge_steps(read_metrics(seed)), seed) for seed in seeds}
    if not any(records for runs in found.values() for records in runs.values()):
        raise FileNotFoundError(f"no metrics under {root}: expected runs/<arm>/seed<k>/metrics.jsonl")
    order = [arm for arm in listed_arms(folder) if arm in found]
    order += [arm for arm in found if arm not in order]
    return {arm: found[arm] for arm in order}


def with_machines(records: list[Record], run_dir: Path) -> list[Record]:
    """The records with the machine each training step (>= 1) ran on under :data:`MACHINE_KEY`: that of
    the last stage that started before it, :data:`UNRECORDED_MACHINE` when no stage record covers it."""
    spans = machine_spans(run_dir)
    for record in records:
        if record["step"] < 1:
            continue
        machine = UNRECORDED_MACHINE
        for after_step, label in spans:
            if after_step < record["step"]:
                machine = label
        record[MACHINE_KEY] = machine
    return records


def value_at(records: Sequence[Record], key: str, step: int) -> float | None:
    steps, values = series(records, key)
    return values[steps.index(step)] if step in steps else None


def common_steps(runs: Iterable[Sequence[Record]], key: str) -> list[int]:
    """The steps at which every one of ``runs`` logged ``key``."""
    sets = [set(series(records, key)[0]) for records in runs]
    return sorted(set.intersection(*sets)) if sets else []


def last_step(records: Sequence[Record]) -> int:
    return max((int(r["step"]) for r in records), default=0)


def seed_curve(
    runs: Iterable[Sequence[Record]], key: str
) -> tuple[list[int], list[float], list[float], list[int]]:
    """Per step any run logged ``key`` at: the steps, the mean over the runs that have it, the t-interval
    half-width (nan below two runs), and how many runs have it."""
    by_step: dict[int, list[float]] = {}
    for records in runs:
        for step, value in zip(*series(records, key)):
            by_step.setdefault(step, []).append(value)
    steps = sorted(by_step)
    stats = [mean_ci(by_step[s]) for s in steps]
    return steps, [m for m, _ in stats], [h for _, h in stats], [len(by_step[s]) for s in steps]
