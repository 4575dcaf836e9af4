"""The numbers of ``spear compare``: per arm, final eval success and area under the eval curve over
seeds, median seconds per step and its overhead against the reference arm, the comparison at the last
eval step every run has, and notes on anything partial or missing; and the same as plain JSON data."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

from spear_engine.compare_runs import (
    MACHINE_KEY,
    UNRECORDED_MACHINE,
    Record,
    Runs,
    common_steps,
    last_step,
    series,
    value_at,
)
from spear_engine.compare_stats import Estimate, estimate, intervals_overlap, json_float, normalised_auc

EVAL_KEYS = {"sampled": "val/success_rate", "greedy": "val_greedy/success_rate"}
TIME_KEY = "time/step"
UPDATE_KEY = "time/update"
TOKENS_KEY = "perf/real_tokens"  # tokens the update trained on (no padding), replay rows included
REPLAY_ROWS_KEY = "actor/replay_rows"
REFERENCE_ARM = "drbot"  # the overhead and difference reference when present, else the first arm


def eval_summary(runs: dict[str, list[Record]], key: str, step: int | None = None) -> dict[str, Any]:
    """Eval success of one arm's seeds that logged ``key``, in percent: the value at ``step`` (default:
    the last step all of those seeds have an eval at) and the normalised area under each seed's curve
    up to that step, each as mean and 95% half-width over seeds."""
    with_eval = {seed: records for seed, records in runs.items() if series(records, key)[0]}
    common = common_steps(with_eval.values(), key)
    if step is None:
        step = common[-1] if common else None
    if step is None or step not in common:
        return {"step": step, "seeds": sorted(with_eval), "final": None, "auc": None}
    finals = [value_at(records, key, step) for records in with_eval.values()]
    aucs = [normalised_auc(*series(records, key), upto=step) for records in with_eval.values()]
    return {
        "step": step,
        "seeds": list(with_eval),
        "final": estimate([v for v in finals if v is not None]).scaled(100.0),
        "auc": estimate(aucs).scaled(100.0),
    }


def median_step_time(runs: dict[str, list[Record]], machines: set[str] | None = None) -> float | None:
    """The median of ``time/step`` over every training step (>= 1) of every seed (that ran on one of
    ``machines``, where given)."""
    return median_over_steps(runs, TIME_KEY, machines=machines)


def median_over_steps(
    runs: dict[str, list[Record]], key: str, per: str | None = None, scale: float = 1.0,
    machines: set[str] | None = None,
) -> float | None:
    """The median of ``key`` (divided by ``per`` and times ``scale`` where given) over every training step
    (>= 1) of every seed that logged them (and ran on one of ``machines``, where given)."""
    values = []
    for records in runs.values():
        for record in records:
            if record.get("step", 0) < 1 or key not in record or (per is not None and not record.get(per)):
                continue
            if machines is not None and record.get(MACHINE_KEY, UNRECORDED_MACHINE) not in machines:
                continue
            values.append(record[key] * scale / (record[per] if per is not None else 1.0))
    return statistics.median(values) if values else None


def step_cost(runs: dict[str, list[Record]]) -> dict[str, float | None]:
    """Where a step's time goes, as medians over training steps: trained tokens (on-policy + replay),
    replay rows, and update seconds per 1,000 trained tokens. An arm whose steps cost more because it
    trains more rows (replay) shows more tokens at the same seconds per token; one slowed by the machine's
    load shows more seconds per token."""
    return {
        "trained_tokens": median_over_steps(runs, TOKENS_KEY),
        "replay_rows": median_over_steps(runs, REPLAY_ROWS_KEY),
        "update_sec_per_1k_tokens": median_over_steps(runs, UPDATE_KEY, per=TOKENS_KEY, scale=1000.0),
    }


def steps_by_machine(runs: dict[str, list[Record]]) -> dict[str, dict[str, int]]:
    """``{machine: {seed: timed training steps}}``: where each seed's timed steps ran."""
    found: dict[str, dict[str, int]] = {}
    for seed, records in runs.items():
        for record in records:
            if record.get("step", 0) >= 1 and TIME_KEY in record:
                per_seed = found.setdefault(record.get(MACHINE_KEY, UNRECORDED_MACHINE), {})
                per_seed[seed] = per_seed.get(seed, 0) + 1
    return found


def step_time_overhead(arm: dict[str, Any], ref: dict[str, Any], arm_runs: dict[str, list[Record]],
                       ref_runs: dict[str, list[Record]]) -> tuple[float | None, list[str]]:
    """The arm's step time over the reference's, minus 1, in percent, from steps on the same machine only
    (a step on a Zen 5 against one on a Zen 4 measures the CPUs, not the algorithm): per machine both ran
    steps on, the ratio of their median step times; over several such machines, the geometric mean of
    those ratios weighted by the arm's steps there. None without a machine in common. Also the machines
    left out, for the notes."""
    shared = sorted(set(arm["machines"]) & set(ref["machines"]))
    left_out = sorted((set(arm["machines"]) | set(ref["machines"])) - set(shared))
    log_ratios, weights = [], []
    for machine in shared:
        own, base = median_step_time(arm_runs, {machine}), median_step_time(ref_runs, {machine})
        if own and base:
            log_ratios.append(math.log(own / base))
            weights.append(sum(arm["machines"][machine].values()))
    if not log_ratios:
        return None, left_out
    mean_log = sum(w * x for w, x in zip(weights, log_ratios)) / sum(weights)
    return (math.exp(mean_log) - 1) * 100, left_out


def paired_difference(arm_runs: dict[str, list[Record]], ref_runs: dict[str, list[Record]], key: str) -> dict[str, Any]:
    """``arm`` minus the reference arm, seed by seed, in percent points, over the seeds both arms ran with
    an eval: at the last eval step all of those runs have, and as the area under the curve up to it.
    Every arm of a seed starts from the same warm-up and plays the same training games, so the per-seed
    difference removes the spread between seeds (a seed whose warm-up lands at 25 % and one at 39 %) that
    unpaired intervals carry. Runs of seeds the other arm lacks do not hold the step back."""
    seeds = [s for s in arm_runs if s in ref_runs and series(arm_runs[s], key)[0] and series(ref_runs[s], key)[0]]
    steps = common_steps([runs[s] for s in seeds for runs in (arm_runs, ref_runs)], key) if seeds else []
    if not steps:
        return {"step": None, "seeds": [], "per_seed": {}, "final": None, "auc": None}
    step = steps[-1]
    per_seed = {
        seed: {
            "final": 100.0 * (value_at(arm_runs[seed], key, step) - value_at(ref_runs[seed], key, step)),
            "auc": 100.0 * (
                normalised_auc(*series(arm_runs[seed], key), upto=step)
                - normalised_auc(*series(ref_runs[seed], key), upto=step)
            ),
        }
        for seed in seeds
    }  # fmt: skip
    return {
        "step": step,
        "seeds": seeds,
        "per_seed": per_seed,
        "final": estimate([d["final"] for d in per_seed.values()]),
        "auc": estimate([d["auc"] for d in per_seed.values()]),
    }


def reference_arm(arms: Sequence[str]) -> str:
    return REFERENCE_ARM if REFERENCE_ARM in arms else arms[0]



def summarize(runs: Runs, listed: Sequence[str] = ()) -> dict[str, Any]:
    """The comparison's numbers (success in percent, :class:`Estimate` objects where over seeds) and
    notes on anything partial or missing. ``listed``: the arms experiment.yaml names."""
    notes: list[str] = [f"{arm}: listed in experiment.yaml but has no runs" for arm in listed if arm not in runs]
    for arm, seeds in runs.items():
        notes += [f"{arm}/{seed}: no metrics logged yet, left out" for seed, r in seeds.items() if not r]
    logged = {arm: {s: r for s, r in seeds.items() if r} for arm, seeds in runs.items()}
    logged = {arm: seeds for arm, seeds in logged.items() if seeds}
    arms = list(logged)
    ref = reference_arm(arms)

    table: dict[str, dict[str, Any]] = {}
    for arm, seeds in logged.items():
        steps_by_seed = {seed: last_step(records) for seed, records in seeds.items()}
        row: dict[str, Any] = {
            "seeds": list(seeds),
            "n_seeds": len(seeds),
            "steps_done": min(steps_by_seed.values()),
            "steps_by_seed": steps_by_seed,
            "sec_per_step_median": median_step_time(seeds),
            "machines": steps_by_machine(seeds),
            "cost": step_cost(seeds),
        }
        if len(seeds) == 1:
            notes.append(f"{arm}: one seed, no interval (n=1)")
        if len(set(steps_by_seed.values())) > 1:
            done = ", ".join(f"{seed} {step}" for seed, step in steps_by_seed.items())
            notes.append(f"{arm}: seeds stopped at different steps ({done})")
        for kind, key in EVAL_KEYS.items():
            row[kind] = eval_summary(seeds, key)
            missing = [seed for seed in seeds if seed not in row[kind]["seeds"]]
            if len(missing) == len(seeds):
                notes.append(f"{arm}: no {kind} eval logged ({key})")
            elif missing:
                notes.append(
                    f"{arm}: {', '.join(missing)} logged no {kind} eval ({key}); "
                    f"its {kind} eval numbers are over the other {len(seeds) - len(missing)} seed(s)"
                )
        table[arm] = row

    for arm, row in table.items():
        row["overhead_pct"], left_out = step_time_overhead(row, table[ref], logged[arm], logged[ref])
        if arm == ref or not left_out:
            continue
        if row["overhead_pct"] is None and not set(row["machines"]) & set(table[ref]["machines"]):
            notes.append(f"{arm}: no step-time overhead vs {ref}: no machine ran steps of both")
        else:
            notes.append(f"{arm}: step-time overhead vs {ref} over the steps both ran on the same machine; "
                         f"steps on {'; '.join(left_out)} left out of it")  # fmt: skip

    # Across arms: the last eval step every run (of every arm) has, and the numbers there.
    common: dict[str, int | None] = {}
    for kind, key in EVAL_KEYS.items():
        with_eval = [r for seeds in logged.values() for r in seeds.values() if series(r, key)[0]]
        steps = common_steps(with_eval, key) if with_eval else []
        common[kind] = steps[-1] if steps else None
        for arm, row in table.items():
            row.setdefault("at_common_step", {})[kind] = eval_summary(logged[arm], key, common[kind])
    partial = any(
        row[kind]["step"] != common[kind]
        for row in table.values()
        for kind in EVAL_KEYS
        if row[kind]["final"] is not None
    )
    if partial:
        at = ", ".join(f"{kind} eval at step {step}" for kind, step in common.items() if step is not None)
        notes.append(f"arms stopped at different steps: compared at the last eval step all runs have ({at})")

    differences: dict[str, dict[str, Any]] = {}
    step = common["sampled"]
    ref_final = table[ref]["at_common_step"]["sampled"]["final"]
    for arm in arms:
        if arm == ref:
            continue
        final = table[arm]["at_common_step"]["sampled"]["final"]
        if final is None or ref_final is None:
            differences[arm] = {"step": step, "mean_diff_pts": None, "intervals_overlap": None}
        else:
            differences[arm] = {
                "step": step,
                "mean_diff_pts": final.mean - ref_final.mean,
                "intervals_overlap": intervals_overlap(final, ref_final),
            }
    paired = {
        arm: {kind: paired_difference(logged[arm], logged[ref], key) for kind, key in EVAL_KEYS.items()}
        for arm in arms
        if arm != ref
    }
    return {
        "arms": table,
        "reference": ref,
        "common_step": common,
        "partial": partial,
        "difference_vs_reference": differences,
        "paired_vs_reference": paired,
        "notes": notes,
    }


def to_json(value: Any) -> Any:
    """The summary as plain JSON data: estimates as ``{mean, half_width, n}``, nan as null."""
    if isinstance(value, Estimate):
        return value.to_json()
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, float):
        return json_float(value)
    return value
