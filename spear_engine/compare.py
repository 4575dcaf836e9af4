"""``spear compare``: the arms of a matched experiment side by side, across seeds.

An experiment folder holds ``runs/<arm>/seed<k>/metrics.jsonl`` (one JSON object per line, several may
share a step) and optionally ``experiment.yaml``, whose ``arms:`` (a list or a mapping) gives the arms'
order; without it the arms are sorted. :func:`compare_experiment` writes, next to it (or to ``out``):

- ``compare.png``: for each arm, the mean over seeds of the curves a reader compares (eval success
  sampled and greedy, train success, entropy, replay buffer, c(t), tool calls, seconds per step), with a
  shaded 95% t-interval band wherever at least two seeds logged the step (one seed: the line only);
- ``results.md``: a table per arm (seeds, steps done, final eval success, area under the eval curve,
  median seconds per step, step-time overhead vs the reference arm) and the difference of each arm's
  final sampled success from the reference arm's;
- ``results.json``: the same numbers (success in percent points, ``null`` where not defined).

Partial runs are reported as they are: an arm's final eval is read at the last eval step that all of
its seeds reached, and when the arms stopped at different steps they are compared at the last eval step
every run has, and the report names that step. Intervals are Student's t over seeds (n - 1 df).
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spear_engine.metrics import read_metrics
from spear_engine.plot import finish_panel

if TYPE_CHECKING:
    from matplotlib.figure import Figure

Record = dict[str, Any]
Runs = dict[str, dict[str, list[Record]]]  # arm -> seed -> merged records, one per step

EVAL_KEYS = {"sampled": "val/success_rate", "greedy": "val_greedy/success_rate"}
TIME_KEY = "time/step"
REFERENCE_ARM = "drbot"  # the overhead and difference reference when present, else the first arm

# (title, metric key, scale): success rates are drawn in percent.
PANELS: list[tuple[str, str, float]] = [
    ("eval success, sampled (%)", EVAL_KEYS["sampled"], 100.0),
    ("eval success, greedy (%)", EVAL_KEYS["greedy"], 100.0),
    ("train success (%)", "episode/success_rate", 100.0),
    ("policy entropy (per token)", "rollout/entropy", 1.0),
    ("replay buffer (rows)", "trajectory_sft_buffersize", 1.0),
    ("replay coef c(t)", "schedule/replay_coef", 1.0),
    ("tool calls per episode", "episode/tool_calls/mean", 1.0),
    ("seconds per step", TIME_KEY, 1.0),
]

# The 0.975 quantile of Student's t for df = 1..30 (two-sided 95%); beyond, a Cornish-Fisher expansion.
_T975 = (
    12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
    2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
    2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423,
)  # fmt: skip
_Z975 = 1.959964


@dataclass(frozen=True)
class Estimate:
    """A mean over seeds and the half-width of its 95% t-interval (nan when n < 2)."""

    mean: float
    half_width: float
    n: int

    def scaled(self, factor: float) -> Estimate:
        return Estimate(self.mean * factor, self.half_width * factor, self.n)

    def to_json(self) -> dict[str, Any]:
        return {"mean": _json_float(self.mean), "half_width": _json_float(self.half_width), "n": self.n}


# ---------------------------------------------------------------- statistics


def t_quantile(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (a table to df 30, then a
    Cornish-Fisher expansion, off by < 1e-3)."""
    if df < 1:
        raise ValueError(f"t_quantile needs df >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """Mean and half-width of the 95% t-interval of the mean: ``t(n-1) * sd / sqrt(n)`` with the sample
    sd. One value has no spread to estimate: half-width nan. No values: both nan."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = math.fsum(values) / n
    if n == 1:
        return mean, math.nan
    return mean, t_quantile(n - 1) * statistics.stdev(values) / math.sqrt(n)


def estimate(values: Sequence[float]) -> Estimate:
    mean, half = mean_ci(values)
    return Estimate(mean, half, len(values))


def normalised_auc(steps: Sequence[int], values: Sequence[float], upto: int) -> float:
    """The trapezoid mean of a curve over its points at steps <= ``upto``: the area divided by the span
    of steps, so a constant curve gives its constant. A single point gives its value; none, nan."""
    points = [(s, v) for s, v in zip(steps, values) if s <= upto]
    if not points:
        return math.nan
    if len(points) == 1:
        return points[0][1]
    area = math.fsum((s1 - s0) * (v0 + v1) / 2 for (s0, v0), (s1, v1) in pairwise(points))
    return area / (points[-1][0] - points[0][0])


# ---------------------------------------------------------------- reading an experiment


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
            found[arm_dir.name] = {seed.name: merge_steps(read_metrics(seed)) for seed in seeds}
    if not any(records for runs in found.values() for records in runs.values()):
        raise FileNotFoundError(f"no metrics under {root}: expected runs/<arm>/seed<k>/metrics.jsonl")
    order = [arm for arm in listed_arms(folder) if arm in found]
    order += [arm for arm in found if arm not in order]
    return {arm: found[arm] for arm in order}


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


# ---------------------------------------------------------------- the numbers


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


def median_step_time(runs: dict[str, list[Record]]) -> float | None:
    """The median of ``time/step`` over every training step (>= 1) of every seed."""
    times = [v for records in runs.values() for s, v in zip(*series(records, TIME_KEY)) if s >= 1]
    return statistics.median(times) if times else None


def reference_arm(arms: Sequence[str]) -> str:
    return REFERENCE_ARM if REFERENCE_ARM in arms else arms[0]


def intervals_overlap(a: Estimate, b: Estimate) -> bool | None:
    """Whether the two 95% intervals overlap; None when either has no interval (n = 1)."""
    if not (math.isfinite(a.half_width) and math.isfinite(b.half_width)):
        return None
    return abs(a.mean - b.mean) <= a.half_width + b.half_width


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

    ref_time = table[ref]["sec_per_step_median"]
    for row in table.values():
        own = row["sec_per_step_median"]
        row["overhead_pct"] = (own / ref_time - 1) * 100 if own is not None and ref_time else None

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
    return {
        "arms": table,
        "reference": ref,
        "common_step": common,
        "partial": partial,
        "difference_vs_reference": differences,
        "notes": notes,
    }


def _json_float(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def to_json(value: Any) -> Any:
    """The summary as plain JSON data: estimates as ``{mean, half_width, n}``, nan as null."""
    if isinstance(value, Estimate):
        return value.to_json()
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, float):
        return _json_float(value)
    return value


# ---------------------------------------------------------------- the report


def format_estimate(est: Estimate | None, n_seeds: int | None = None) -> str:
    """``mean ± half`` (one decimal), ``mean (n=1)`` for one seed, the count when fewer seeds than the
    arm has, ``no eval`` for none."""
    if est is None or est.n == 0:
        return "no eval"
    text = f"{est.mean:.1f} (n=1)" if est.n == 1 else f"{est.mean:.1f} ± {est.half_width:.1f}"
    if est.n > 1 and n_seeds is not None and est.n < n_seeds:
        text += f" (n={est.n})"
    return text


def _fmt_optional(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else fmt.format(value)


def results_markdown(summary: dict[str, Any], title: str = "experiment") -> str:
    """The summary as a markdown report: the per-arm table, the common-step table when the arms stopped
    at different steps, the differences from the reference arm, and the notes."""
    ref = summary["reference"]
    lines = [
        f"# Compare: {title}",
        "",
        "Mean over seeds ± half-width of the 95% t-interval (Student's t, n-1 df); success in percent "
        f"points. Reference arm for step-time overhead and differences: **{ref}**.",
        "",
        "| arm | seeds | steps done | eval step | final eval, sampled (%) | final eval, greedy (%) "
        f"| AUC eval, sampled (%) | AUC eval, greedy (%) | median s/step | step-time overhead vs {ref} |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, row in summary["arms"].items():
        n, sampled, greedy = row["n_seeds"], row["sampled"], row["greedy"]
        greedy_final = format_estimate(greedy["final"], n)
        if greedy["final"] is not None and greedy["step"] != sampled["step"]:
            greedy_final += f" @ step {greedy['step']}"
        overhead = "reference" if arm == ref else _fmt_optional(row["overhead_pct"], "{:+.1f}%")
        lines.append(
            f"| {arm} | {n} | {row['steps_done']} | {_fmt_optional(sampled['step'], '{}')} "
            f"| {format_estimate(sampled['final'], n)} | {greedy_final} "
            f"| {format_estimate(sampled['auc'], n)} | {format_estimate(greedy['auc'], n)} "
            f"| {_fmt_optional(row['sec_per_step_median'], '{:.2f}')} | {overhead} |"
        )
    lines += [
        "",
        "Final eval: at the last step every seed of the arm has an eval at (`eval step`). AUC: the "
        "trapezoid mean of the eval success curve over steps 0..that step. Steps done: the fewest steps "
        "any seed of the arm reached. Median s/step: over all training steps of all seeds.",
    ]
    common = summary["common_step"]
    if summary["partial"]:
        lines += [
            "",
            "## At the common step",
            "",
            "The arms stopped at different steps, so they are compared at the last eval step all runs "
            f"have: step {_fmt_optional(common['sampled'], '{}')} (sampled), "
            f"step {_fmt_optional(common['greedy'], '{}')} (greedy).",
            "",
            "| arm | eval, sampled (%) | eval, greedy (%) | AUC, sampled (%) | AUC, greedy (%) |",
            "|---|---|---|---|---|",
        ]
        for arm, row in summary["arms"].items():
            at, n = row["at_common_step"], row["n_seeds"]
            lines.append(
                f"| {arm} | {format_estimate(at['sampled']['final'], n)} "
                f"| {format_estimate(at['greedy']['final'], n)} "
                f"| {format_estimate(at['sampled']['auc'], n)} | {format_estimate(at['greedy']['auc'], n)} |"
            )
    diffs = summary["difference_vs_reference"]
    if diffs:
        step = common["sampled"]
        where = f"at step {step}" if step is not None else "(no eval step common to all runs)"
        lines += ["", f"## Difference vs reference arm ({ref}): final sampled eval success {where}", ""]
        ref_final = summary["arms"][ref]["at_common_step"]["sampled"]["final"]
        for arm, diff in diffs.items():
            if diff["mean_diff_pts"] is None:
                lines.append(f"- {arm}: n/a (no sampled eval at a step common to all runs)")
                continue
            final = summary["arms"][arm]["at_common_step"]["sampled"]["final"]
            overlap = {True: "yes", False: "no", None: "n/a (n=1, no interval)"}[diff["intervals_overlap"]]
            lines.append(
                f"- {arm}: {diff['mean_diff_pts']:+.1f} points ({arm} {format_estimate(final)}, "
                f"{ref} {format_estimate(ref_final)}); 95% intervals overlap: {overlap}"
            )
    if summary["notes"]:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in summary["notes"]]
    return "\n".join(lines) + "\n"


def compare_figure(runs: Runs, title: str = "experiment") -> Figure:
    """The panels of :data:`PANELS`: per arm, the mean over seeds and, where >= 2 seeds logged the step,
    a shaded 95% t-interval band."""
    from matplotlib.figure import Figure

    cols = 4
    rows = (len(PANELS) + cols - 1) // cols
    fig = Figure(figsize=(4.5 * cols, 3.4 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, (panel, key, scale) in zip(axes.flat, PANELS):
        drawn = False
        for i, (arm, seeds) in enumerate(runs.items()):
            logged = [records for records in seeds.values() if records]
            steps, means, halves, counts = seed_curve(logged, key)
            if not steps:
                continue
            color = f"C{i % 10}"
            ys = [m * scale for m in means]
            ax.plot(steps, ys, color=color, marker="o" if len(steps) < 30 else None, markersize=3,
                    label=f"{arm} (n={len(logged)})")  # fmt: skip
            if any(c >= 2 for c in counts):
                band = [h * scale if c >= 2 else 0.0 for h, c in zip(halves, counts)]
                lo, hi = [y - b for y, b in zip(ys, band)], [y + b for y, b in zip(ys, band)]
                if scale == 100.0:  # a success rate: draw the band inside [0, 100] (the table keeps it whole)
                    lo, hi = [max(v, 0.0) for v in lo], [min(v, 100.0) for v in hi]
                ax.fill_between(steps, lo, hi, where=[c >= 2 for c in counts], color=color, alpha=0.2,
                                linewidth=0)  # fmt: skip
            drawn = True
        finish_panel(ax, panel, drawn)
    for ax in list(axes.flat)[len(PANELS) :]:
        ax.axis("off")
    fig.suptitle(f"{title}: mean over seeds, shaded 95% t-interval")
    fig.tight_layout()
    return fig


def compare_experiment(folder: str | Path, out: str | Path | None = None) -> dict[str, Path]:
    """Write ``compare.png``, ``results.md`` and ``results.json`` to ``out`` (default: the experiment
    folder) and return their paths as ``{"png", "md", "json"}``."""
    runs = load_runs(folder)
    title = Path(folder).resolve().name
    summary = summarize(runs, listed_arms(folder))
    dest = Path(out) if out is not None else Path(folder)
    dest.mkdir(parents=True, exist_ok=True)
    paths = {"png": dest / "compare.png", "md": dest / "results.md", "json": dest / "results.json"}
    compare_figure(runs, title).savefig(paths["png"], dpi=90)
    paths["md"].write_text(results_markdown(summary, title))
    paths["json"].write_text(json.dumps(to_json(summary), indent=2) + "\n")
    return paths
