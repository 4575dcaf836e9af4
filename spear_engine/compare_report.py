"""The report of ``spear compare``: its summary (:func:`spear_engine.compare_summary.summarize`) as
``results.md``: the per-arm table, the common-step table, the differences from the reference arm (of the
means, and paired by seed), notes."""

from __future__ import annotations

from typing import Any

from spear_engine.compare_stats import Estimate


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


def _cost_table(summary: dict[str, Any]) -> list[str]:
    """Medians over training steps: what each arm trains per step and what a token of update costs."""
    lines = [
        "",
        "## Cost per step",
        "",
        "Medians over training steps. An arm that trains more rows (replay) costs more per step at the same "
        "seconds per token; a step slowed by other load on the machine shows as more seconds per token.",
        "",
        "| arm | trained tokens / step | replay rows / step | update s / 1k trained tokens |",
        "|---|---|---|---|",
    ]
    for arm, row in summary["arms"].items():
        cost = row.get("cost") or {}
        lines.append(
            f"| {arm} | {_fmt_optional(cost.get('trained_tokens'), '{:.0f}')} "
            f"| {_fmt_optional(cost.get('replay_rows'), '{:.0f}')} "
            f"| {_fmt_optional(cost.get('update_sec_per_1k_tokens'), '{:.2f}')} |"
        )
    return lines


def _machines_table(summary: dict[str, Any]) -> list[str]:
    """Where each arm's timed steps ran, when not all on one machine: step times (and the overhead) are
    only comparable between steps on the same kind of machine."""
    machines = sorted({m for row in summary["arms"].values() for m in row.get("machines", {})})
    if len(machines) < 2:
        return []
    lines = [
        "", "## Machines", "",
        f"The runs' steps ran on {len(machines)} kinds of machine, and seconds (per step, per token) depend on it. "
        "The step-time overhead compares only steps "
        "that an arm and the reference ran on the same machine; the median s/step column mixes them.",
        "", "| arm | " + " | ".join(machines) + " |", "|---|" + "---|" * len(machines),
    ]  # fmt: skip
    for arm, row in summary["arms"].items():
        cells = []
        for machine in machines:
            per_seed = row.get("machines", {}).get(machine, {})
            cells.append(", ".join(f"{seed}: {n} steps" for seed, n in per_seed.items()) or "-")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return lines


def _paired_table(summary: dict[str, Any]) -> list[str]:
    """Arm minus reference, seed by seed (same warm-up, same training games), then over seeds."""
    paired = summary.get("paired_vs_reference") or {}
    if not paired:
        return []
    ref = summary["reference"]
    lines = [
        "", f"## Paired by seed: arm minus {ref} (same warm-up and training games per seed), percent points", "",
        "Per seed: the difference at the last eval step every paired run of the arm and the reference has (`step`: "
        "sampled / greedy), and of the AUC up to it. "
        "Over seeds: mean ± 95% t-half-width of those differences; an interval that excludes 0 separates the arms.",
        "", "| arm | seed | step | final, sampled | final, greedy | AUC, sampled | AUC, greedy |",
        "|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for arm, kinds in paired.items():
        sampled, greedy = kinds["sampled"], kinds["greedy"]
        step = f"{_fmt_optional(sampled['step'], '{}')} / {_fmt_optional(greedy['step'], '{}')}"
        for seed in sampled["seeds"]:
            g = greedy["per_seed"].get(seed)
            lines.append(
                f"| {arm} | {seed} | {step} | {sampled['per_seed'][seed]['final']:+.1f} | "
                f"{_fmt_optional(g and g['final'], '{:+.1f}')} | {sampled['per_seed'][seed]['auc']:+.1f} | "
                f"{_fmt_optional(g and g['auc'], '{:+.1f}')} |"
            )
        n = len(sampled["seeds"])
        lines.append(
            f"| {arm} | mean over {n} | {step} | {format_estimate(sampled['final'])} | {format_estimate(greedy['final'])} | "
            f"{format_estimate(sampled['auc'])} | {format_estimate(greedy['auc'])} |"
        )
    return lines


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
        "any seed of the arm reached. Median s/step: over all training steps of all seeds. Step-time "
        "overhead: the ratio of the arm's median s/step to the reference's on the same kind of machine "
        "(a step-weighted geometric mean where they shared several).",
    ]
    lines += _cost_table(summary)
    lines += _machines_table(summary)
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
    lines += _paired_table(summary)
    if summary["notes"]:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in summary["notes"]]
    return "\n".join(lines) + "\n"
