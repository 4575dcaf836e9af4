"""``spear experiment <name> --status``: where a results folder stands, without running anything.

An experiment takes hours and continues across separate invocations (often on another machine, from a
fresh clone that has the committed metrics but no checkpoints or warm-up weights). Before continuing one,
a user wants to know what the next call will do: which runs are finished, which resume from a checkpoint
(and from which step), which start over, which warm-ups must be trained again, and roughly how long the
rest takes at the pace of the runs already finished.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spear_engine.experiment import DONE_FILE, START_EVAL_FILE, ExperimentSpec
from spear_engine.machine import machine_spans
from spear_engine.metrics import METRICS_FILE
from spear_engine.train.checkpoint import PREFIX, list_checkpoints


@dataclass
class RunStatus:
    seed: int
    arm: str
    state: str
    """``done``, ``resumes``, ``starts over`` or ``not started``."""
    detail: str
    wall_s: float | None = None
    """Wall time of a run finished in one go (resumed ones do not tell the pace of a whole run)."""


def warmup_state(warm: Path) -> str:
    """What the next call does with a seed's warm-up."""
    has_eval = (warm / START_EVAL_FILE).is_file()
    has_model = (warm / "model" / "config.json").is_file()
    if has_eval and has_model:
        return "ready (weights and step-0 evaluation)"
    if has_eval:
        return "evaluation recorded, weights missing: trained again (and checked against the record) if a run needs it"
    return "not trained yet"


def run_status(run_dir: Path, seed: int, arm: str, steps: int) -> RunStatus:
    """One run's state: finished (its done file reached ``steps``), resumable from its newest checkpoint,
    started without a checkpoint (metrics only: the next call starts it over), or not started."""
    done: dict[str, Any] = json.loads((run_dir / DONE_FILE).read_text()) if (run_dir / DONE_FILE).is_file() else {}
    finished = int(done.get("steps", 0))
    machines = sorted({label for _, label in machine_spans(run_dir)})
    where = f" on {'; '.join(machines)}" if machines else ""
    if finished >= steps:
        resumed = int(done.get("resumed_from", 0))
        minutes = ""
        if "wall_s" in done:
            minutes = f", {done['wall_s'] / 60:.1f} min" + (f" from its step-{resumed} checkpoint" if resumed else "")
        whole = done.get("wall_s") if not resumed else None
        return RunStatus(seed, arm, "done", f"{finished} steps{minutes}{where}", whole)
    checkpoints = list_checkpoints(run_dir)
    if checkpoints:
        step = int(checkpoints[-1].name.removeprefix(PREFIX))
        return RunStatus(seed, arm, "resumes", f"from its step-{step} checkpoint, {steps - step} steps to go")
    if finished:  # finished an earlier, shorter --steps without a kept final checkpoint
        return RunStatus(seed, arm, "starts over", f"finished {finished} steps and kept no checkpoint to extend")
    if (run_dir / METRICS_FILE).is_file():
        return RunStatus(seed, arm, "starts over", "started, no checkpoint yet (still running? another machine or clone?)")
    return RunStatus(seed, arm, "not started", "")


def experiment_status(spec: ExperimentSpec, folder: Path) -> str:
    """The status report of every (seed, arm) run of ``spec`` in ``folder``, as text."""
    lines = [f"{folder}: {len(spec.arms)} arms x {len(spec.seeds)} seeds x {spec.steps} steps"]
    runs: list[RunStatus] = []
    for seed in spec.seeds:
        seed_runs = [run_status(folder / "runs" / arm / f"seed{seed}", seed, arm, spec.steps) for arm in spec.arms]
        runs += seed_runs
        needs_warmup = any(run.state != "done" for run in seed_runs)
        warm = warmup_state(folder / "warmup" / f"seed{seed}")
        lines.append(f"seed {seed}: warm-up {warm}" if needs_warmup else f"seed {seed}: every run done")
        for run in seed_runs:
            lines.append(f"  {run.arm:14s} {run.state}" + (f": {run.detail}" if run.detail else ""))
    left = [run for run in runs if run.state != "done"]
    counts = {state: sum(run.state == state for run in runs) for state in ("done", "resumes", "starts over", "not started")}
    lines.append(", ".join(f"{n} {state}" for state, n in counts.items() if n))
    paces = [run.wall_s for run in runs if run.wall_s is not None]
    if left and paces:
        per_run = statistics.median(paces)
        lines.append(f"about {len(left) * per_run / 3600:.1f} h left at the median pace of the {len(paces)} runs "
                     f"finished in one go ({per_run / 60:.0f} min a run; warm-ups and resumes not counted)")  # fmt: skip
    return "\n".join(lines)
