"""``spear compare``: numbers over seeds checked against hand computations on synthetic experiments."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from spear_engine.compare import compare_experiment, compare_figure, load_runs, summarize
from spear_engine.compare_runs import series
from spear_engine.compare_stats import Estimate, intervals_overlap, mean_ci, normalised_auc, t_quantile

SAMPLED, GREEDY = "val/success_rate", "val_greedy/success_rate"


def write_run(
    folder: Path, arm: str, seed: int, evals: dict[int, float], steps: int, sec: float = 10.0,
    greedy: dict[int, float] | None = None, machines: list[tuple[int, str]] = (), secs: dict[int, float] | None = None,
) -> None:  # fmt: skip
    """A metrics.jsonl as a run writes it: step 0 is the warm-up record, then the eval record of the same
    step; steps 1..steps carry train metrics (``secs[step]`` or ``sec`` seconds a step), and eval records
    at the steps of ``evals``. ``machines``: the machines.jsonl stages, ``(after_step, label)``."""
    run = folder / "runs" / arm / f"seed{seed}"
    run.mkdir(parents=True)
    lines: list[dict[str, Any]] = [{"step": 0, "sft/nll": 2.0}]
    for step in range(steps + 1):
        if step >= 1:
            took = (secs or {}).get(step, sec)
            lines.append({"step": step, "episode/success_rate": 0.5, "time/step": took, "rollout/entropy": 1.0})
        record: dict[str, Any] = {}
        if step in evals:
            record[SAMPLED] = evals[step]
        if greedy and step in greedy:
            record[GREEDY] = greedy[step]
        if record:
            lines.append({"step": step, **record})
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (run / "config.yaml").write_text(f"seed: {seed}\n")
    if machines:
        stages = [{"after_step": after, "machine": label, "torch": "2.13.0"} for after, label in machines]
        (run / "machines.jsonl").write_text("".join(json.dumps(stage) + "\n" for stage in stages))


def test_cost_per_step_separates_more_rows_from_slower_tokens(tmp_path: Path) -> None:
    """Medians over training steps of trained tokens, replay rows and update seconds per 1k tokens: an arm
    that trains replay rows shows more tokens at the same cost per token; step 0 (the warm-up record) and
    steps that logged no tokens are left out."""
    per_arm = {  # arm: (step, update seconds, trained tokens, replay rows) per training step
        "drbot": [(1, 10.0, 2000, 0), (2, 30.0, 3000, 0), (3, 12.0, 4000, 0)],
        "spear": [(1, 20.0, 4000, 10), (2, 24.0, 6000, 30), (3, 40.0, 8000, 20), (4, 5.0, 0, 0)],
    }
    for arm, steps in per_arm.items():
        run = tmp_path / "runs" / arm / "seed0"
        run.mkdir(parents=True)
        records = [{"step": 0, "sft/nll": 1.0, "time/update": 99.0, "perf/real_tokens": 1.0}]
        records += [{"step": st, "time/step": sec + 1, "time/update": sec, "perf/real_tokens": tok,
                     "actor/replay_rows": rows} for st, sec, tok, rows in steps]  # fmt: skip
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    result = json.loads(compare_experiment(tmp_path)["json"].read_text())
    drbot, spear = result["arms"]["drbot"]["cost"], result["arms"]["spear"]["cost"]
    assert drbot["trained_tokens"] == 3000 and drbot["replay_rows"] == 0
    assert drbot["update_sec_per_1k_tokens"] == pytest.approx(5.0)  # median of 5, 10, 3
    assert spear["trained_tokens"] == 5000  # median of 4000, 6000, 8000, 0 (step 4 logged 0 tokens)
    assert spear["replay_rows"] == 15  # median of 10, 30, 20, 0
    assert spear["update_sec_per_1k_tokens"] == pytest.approx(5.0)  # median of 5, 4, 5 (step 4 left out)
    md = (tmp_path / "results.md").read_text()
    assert "| drbot | 3000 | 0 | 5.00 |" in md and "| spear | 5000 | 15 | 5.00 |" in md


def test_mean_ci_matches_hand_computation() -> None:
    mean, half = mean_ci([0.2, 0.4, 0.6])
    assert mean == pytest.approx(0.4)
    assert half == pytest.approx(4.303 * 0.2 / math.sqrt(3), rel=1e-4)  # sd 0.2, t(2) = 4.303
    mean, half = mean_ci([0.7])
    assert mean == 0.7 and math.isnan(half)  # one seed: no interval
    assert all(math.isnan(x) for x in mean_ci([]))
    assert t_quantile(1) == pytest.approx(12.706, abs=1e-3)
    assert t_quantile(30) == pytest.approx(2.042, abs=1e-3)
    assert t_quantile(40) == pytest.approx(2.021, abs=1e-3)  # beyond the table
    assert t_quantile(120) == pytest.approx(1.980, abs=1e-3)


def test_series_merges_records_of_a_step_last_value_wins() -> None:
    records = [
        {"step": 0, "sft/nll": 2.0},
        {"step": 0, SAMPLED: 0.25},
        {"step": 1, SAMPLED: None, "time/step": 3.0},
        {"step": 2, SAMPLED: 0.1},
        {"step": 2, SAMPLED: 0.5},  # logged again: the last one counts
        {"step": 3, SAMPLED: float("nan")},
    ]
    assert series(records, SAMPLED) == ([0, 2], [0.25, 0.5])
    assert series(records, "time/step") == ([1], [3.0])
    assert series(records, "missing") == ([], [])


def test_normalised_auc_weights_by_step_spacing() -> None:
    # Evals at 0, 5, 20 with success 0, 1, 1: area 0.5*5 + 1*15 = 17.5 over 20 steps.
    assert normalised_auc([0, 5, 20], [0.0, 1.0, 1.0], upto=20) == pytest.approx(0.875)
    assert normalised_auc([0, 5, 20], [0.0, 1.0, 1.0], upto=5) == pytest.approx(0.5)
    assert normalised_auc([0, 10], [0.3, 0.3], upto=10) == pytest.approx(0.3)
    assert normalised_auc([0], [0.4], upto=0) == 0.4


def test_intervals_overlap() -> None:
    assert intervals_overlap(Estimate(40.0, 10.0, 3), Estimate(55.0, 6.0, 3)) is True
    assert intervals_overlap(Estimate(40.0, 10.0, 3), Estimate(57.0, 6.0, 3)) is False
    assert intervals_overlap(Estimate(40.0, math.nan, 1), Estimate(57.0, 6.0, 3)) is None


def make_matched(folder: Path) -> None:
    """drbot and spear, 3 seeds each, 20 steps, evals at 0, 10, 20; spear lists first in experiment.yaml."""
    drbot = [[0.1, 0.1, 0.2], [0.1, 0.3, 0.4], [0.1, 0.5, 0.6]]
    spear = [[0.1, 0.5, 0.7], [0.1, 0.5, 0.8], [0.1, 0.5, 0.9]]
    for arm, curves, sec in (("drbot", drbot, 10.0), ("spear", spear, 12.5)):
        for seed, curve in enumerate(curves):
            write_run(folder, arm, seed, dict(zip((0, 10, 20), curve)), steps=20, sec=sec,
                      greedy={0: 0.0, 20: 0.3})  # fmt: skip
    (folder / "experiment.yaml").write_text("arms:\n  spear: {preset: spear}\n  drbot: {preset: drbot}\n")


def test_table_final_auc_overhead_and_difference(tmp_path: Path) -> None:
    make_matched(tmp_path)
    paths = compare_experiment(tmp_path)
    assert set(paths) == {"png", "md", "json"}
    assert paths["md"] == tmp_path / "results.md"
    result = json.loads(paths["json"].read_text())
    assert list(result["arms"]) == ["spear", "drbot"]  # experiment.yaml order
    assert result["reference"] == "drbot" and result["partial"] is False
    assert result["common_step"] == {"sampled": 20, "greedy": 20}

    drbot = result["arms"]["drbot"]
    assert drbot["n_seeds"] == 3 and drbot["steps_done"] == 20 and drbot["sampled"]["step"] == 20
    # final sampled success: [0.2, 0.4, 0.6] -> 40 points ± t(2) * 20 / sqrt(3)
    assert drbot["sampled"]["final"]["mean"] == pytest.approx(40.0)
    assert drbot["sampled"]["final"]["half_width"] == pytest.approx(4.3027 * 20 / math.sqrt(3), rel=1e-4)
    # AUC per seed: (0.1+0.1)/2*10 + (0.1+0.2)/2*10 = 2.5 -> 0.125; likewise 0.275, 0.425; sd 0.15
    assert drbot["sampled"]["auc"]["mean"] == pytest.approx(27.5)
    assert drbot["sampled"]["auc"]["half_width"] == pytest.approx(4.3027 * 15 / math.sqrt(3), rel=1e-4)
    # greedy: 0.3 at step 20 in every seed (no spread); AUC (0 + 0.3) / 2 = 15 points
    assert drbot["greedy"]["final"] == {"mean": pytest.approx(30.0), "half_width": 0.0, "n": 3}
    assert drbot["greedy"]["auc"]["mean"] == pytest.approx(15.0)
    assert drbot["sec_per_step_median"] == 10.0 and drbot["overhead_pct"] == pytest.approx(0.0)

    spear = result["arms"]["spear"]
    assert spear["sampled"]["final"]["mean"] == pytest.approx(80.0)  # [0.7, 0.8, 0.9]
    assert spear["sampled"]["final"]["half_width"] == pytest.approx(4.3027 * 10 / math.sqrt(3), rel=1e-4)
    assert spear["overhead_pct"] == pytest.approx(25.0)  # 12.5 s vs 10 s per step
    diff = result["difference_vs_reference"]["spear"]
    assert diff["step"] == 20 and diff["mean_diff_pts"] == pytest.approx(40.0)
    assert diff["intervals_overlap"] is True  # 40 <= 49.7 + 24.8

    md = paths["md"].read_text()
    rows = [line for line in md.splitlines() if line.startswith("| spear |") or line.startswith("| drbot |")]
    assert rows[0].startswith("| spear |")
    assert "| 40.0 ± 49.7 |" in rows[1] and "| 27.5 ± 37.3 |" in rows[1] and "| reference |" in rows[1]
    assert "| 80.0 ± 24.8 |" in rows[0] and "+25.0%" in rows[0]
    assert "- spear: +40.0 points" in md and "overlap: yes" in md
    assert "At the common step" not in md


def test_step_time_overhead_compares_only_steps_on_the_same_machine(tmp_path: Path) -> None:
    """A faster CPU must not pass for a cheaper algorithm: the overhead uses the steps an arm and the
    reference ran on the same machine, a resumed run's steps count where they ran, and an arm with no
    machine in common with the reference gets no overhead; the report says which steps ran where."""
    zen4, zen5 = "AMD EPYC (cpu family 25, model 17), 2 CPUs", "AMD EPYC (cpu family 26, model 2), 2 CPUs"
    for seed in (0, 1):
        write_run(tmp_path, "drbot", seed, {0: 0.1, 4: 0.2}, steps=4, sec=10.0, machines=[(0, zen4)])
    write_run(tmp_path, "spear", 0, {0: 0.1, 4: 0.3}, steps=4, sec=12.5, machines=[(0, zen4)])
    # seed 1 resumed on the faster machine after step 1: steps 2-8 take 5 s there
    write_run(tmp_path, "spear", 1, {0: 0.1, 4: 0.3}, steps=8, secs={1: 12.5} | {s: 5.0 for s in range(2, 9)},
              machines=[(0, zen4), (1, zen5)])  # fmt: skip
    write_run(tmp_path, "grpo", 0, {0: 0.1, 4: 0.2}, steps=4, sec=4.0, machines=[(0, zen5)])
    result = json.loads(compare_experiment(tmp_path)["json"].read_text())
    arms = result["arms"]
    assert arms["spear"]["overhead_pct"] == pytest.approx(25.0)  # 12.5 vs 10 s, the zen5 steps left out
    assert arms["spear"]["sec_per_step_median"] == pytest.approx(5.0)  # all steps: 5 x 12.5, 7 x 5
    assert arms["spear"]["machines"] == {zen4: {"seed0": 4, "seed1": 1}, zen5: {"seed1": 7}}
    assert arms["grpo"]["overhead_pct"] is None
    assert arms["drbot"]["overhead_pct"] == pytest.approx(0.0)
    notes = result["notes"]
    assert any(n.startswith("grpo: no step-time overhead vs drbot") for n in notes)
    assert any(n.startswith("spear: step-time overhead vs drbot over the steps") and zen5 in n for n in notes)
    md = (tmp_path / "results.md").read_text()
    assert "## Machines" in md
    assert "| spear | seed0: 4 steps, seed1: 1 steps | seed1: 7 steps |" in md
    assert "| grpo | - | seed0: 4 steps |" in md


def test_step_time_overhead_over_several_shared_machines_is_per_machine(tmp_path: Path) -> None:
    """Both arms ran on two machines in different proportions: pooled medians would compare mostly-fast
    steps with mostly-slow ones (here -16.7 %); per machine the arm costs 25 % more on each."""
    fast, slow = "fast CPU, 2 CPUs", "slow CPU, 2 CPUs"
    write_run(tmp_path, "drbot", 0, {0: 0.1, 8: 0.2}, steps=8, secs={s: 10.0 if s <= 4 else 5.0 for s in range(1, 9)},
              machines=[(0, slow), (4, fast)])  # fmt: skip
    write_run(tmp_path, "spear", 0, {0: 0.1, 8: 0.2}, steps=8, secs={1: 12.5} | {s: 6.25 for s in range(2, 9)},
              machines=[(0, slow), (1, fast)])  # fmt: skip
    spear = json.loads(compare_experiment(tmp_path)["json"].read_text())["arms"]["spear"]
    assert spear["overhead_pct"] == pytest.approx(25.0)
    assert spear["machines"] == {slow: {"seed0": 1}, fast: {"seed0": 7}}


def test_runs_without_a_machine_record_compare_with_each_other(tmp_path: Path) -> None:
    """Runs written before machines were recorded: one unknown machine, no machines table."""
    write_run(tmp_path, "drbot", 0, {0: 0.1, 4: 0.2}, steps=4, sec=10.0)
    write_run(tmp_path, "spear", 0, {0: 0.1, 4: 0.2}, steps=4, sec=15.0)
    result = json.loads(compare_experiment(tmp_path)["json"].read_text())
    assert result["arms"]["spear"]["overhead_pct"] == pytest.approx(50.0)
    assert list(result["arms"]["spear"]["machines"]) == ["machine not recorded"]
    assert "## Machines" not in (tmp_path / "results.md").read_text()


def test_a_damaged_machines_file_is_named(tmp_path: Path) -> None:
    write_run(tmp_path, "drbot", 0, {0: 0.1, 4: 0.2}, steps=4, machines=[(0, "a")])
    path = tmp_path / "runs" / "drbot" / "seed0" / "machines.jsonl"
    path.write_text(path.read_text() + '{"machine": "b"}\n')
    with pytest.raises(ValueError, match=r"machines.jsonl:2: expected"):
        load_runs(tmp_path)


def test_paired_by_seed_separates_arms_that_unpaired_intervals_cannot(tmp_path: Path) -> None:
    """Seeds that start far apart (warm-ups at 20, 50, 80 %) and an arm 5-7 points above the reference in
    every seed: the per-seed differences exclude 0 (unpaired, the spread of the starts would swamp them).
    A seed only one arm ran is left out, and a reference seed still running does not hold the paired
    step back (the unpaired comparison waits for it)."""
    starts = [0.2, 0.5, 0.8]
    gains = [0.05, 0.06, 0.07]
    for seed, (start, gain) in enumerate(zip(starts, gains)):
        write_run(tmp_path, "drbot", seed, {0: start, 4: start}, steps=4, greedy={0: start, 4: start})
        write_run(tmp_path, "spear", seed, {0: start, 4: start + gain}, steps=4, greedy={0: start, 4: start - gain})
    write_run(tmp_path, "spear", 3, {0: 0.1, 4: 0.9}, steps=4, greedy={0: 0.1, 4: 0.9})
    write_run(tmp_path, "drbot", 4, {0: 0.3}, steps=1, greedy={0: 0.3})  # a reference seed still at step 1
    paths = compare_experiment(tmp_path)
    result = json.loads(paths["json"].read_text())
    assert result["common_step"]["sampled"] == 0  # the unpaired comparison waits for drbot seed 4

    paired = result["paired_vs_reference"]["spear"]
    sampled, greedy = paired["sampled"], paired["greedy"]
    assert sampled["step"] == 4 and sampled["seeds"] == ["seed0", "seed1", "seed2"]  # seeds 3 and 4 unpaired
    assert [sampled["per_seed"][s]["final"] for s in sampled["seeds"]] == pytest.approx([5.0, 6.0, 7.0])
    # differences 5, 6, 7: mean 6, sd 1, half-width t(2) / sqrt(3)
    assert sampled["final"]["mean"] == pytest.approx(6.0)
    assert sampled["final"]["half_width"] == pytest.approx(4.3027 / math.sqrt(3), rel=1e-4)
    assert sampled["final"]["mean"] - sampled["final"]["half_width"] > 0
    # AUC over steps 0..4 of a line from the shared start: half the final difference
    assert [sampled["per_seed"][s]["auc"] for s in sampled["seeds"]] == pytest.approx([2.5, 3.0, 3.5])
    assert greedy["final"]["mean"] == pytest.approx(-6.0)

    md = paths["md"].read_text()
    assert "## Paired by seed: arm minus drbot" in md
    assert "| spear | seed1 | 4 / 4 | +6.0 | -6.0 | +3.0 | -3.0 |" in md
    assert f"| spear | mean over 3 | 4 / 4 | 6.0 ± {4.3027 / math.sqrt(3):.1f} |" in md


def test_partial_runs_are_compared_at_the_last_common_eval_step(tmp_path: Path) -> None:
    # a: two seeds to step 30. b: seed0 to step 30, seed1 stopped at 20. Evals every 10 steps.
    write_run(tmp_path, "a", 0, {0: 0.0, 10: 0.2, 20: 0.4, 30: 0.6}, steps=30)
    write_run(tmp_path, "a", 1, {0: 0.0, 10: 0.2, 20: 0.2, 30: 0.8}, steps=30)
    write_run(tmp_path, "b", 0, {0: 0.0, 10: 0.4, 20: 0.6, 30: 1.0}, steps=30)
    write_run(tmp_path, "b", 1, {0: 0.0, 10: 0.4, 20: 0.8}, steps=20)
    summary = summarize(load_runs(tmp_path))
    a, b = summary["arms"]["a"], summary["arms"]["b"]
    assert summary["reference"] == "a"  # no drbot: the first arm
    assert a["steps_done"] == 30 and b["steps_done"] == 20
    assert a["sampled"]["step"] == 30 and a["sampled"]["final"].mean == pytest.approx(70.0)
    assert b["sampled"]["step"] == 20 and b["sampled"]["final"].mean == pytest.approx(70.0)  # 0.6, 0.8
    assert summary["partial"] is True and summary["common_step"]["sampled"] == 20
    at_a = a["at_common_step"]["sampled"]
    assert at_a["step"] == 20 and at_a["final"].mean == pytest.approx(30.0)  # 0.4, 0.2
    # a's AUC to step 20: seed0 (1 + 3)/20 = 0.2, seed1 (1 + 2)/20 = 0.15
    assert at_a["auc"].mean == pytest.approx(17.5)
    diff = summary["difference_vs_reference"]["b"]
    assert diff["step"] == 20 and diff["mean_diff_pts"] == pytest.approx(40.0)
    # half-widths: a 12.706 * 14.14 / 1.414 = 127.1, b likewise: overlap
    assert diff["intervals_overlap"] is True
    assert any("b: seeds stopped at different steps (seed0 30, seed1 20)" in n for n in summary["notes"])

    md = compare_experiment(tmp_path, out=tmp_path / "report")["md"].read_text()
    assert "## At the common step" in md and "step 20 (sampled)" in md
    assert "final sampled eval success at step 20" in md and "- b: +40.0 points" in md


def test_png_is_written_with_a_band_only_where_two_seeds_have_the_step(tmp_path: Path) -> None:
    write_run(tmp_path, "one", 0, {0: 0.1, 2: 0.3}, steps=2)
    write_run(tmp_path, "two", 0, {0: 0.2, 2: 0.4}, steps=2)
    write_run(tmp_path, "two", 1, {0: 0.4, 2: 0.8}, steps=2)
    out = tmp_path / "out"
    paths = compare_experiment(tmp_path, out=out)
    assert paths["png"] == out / "compare.png"
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fig = compare_figure(load_runs(tmp_path))
    ax = next(a for a in fig.axes if a.get_title() == "eval success, sampled (%)")
    one, two = ax.get_lines()
    assert list(one.get_ydata()) == pytest.approx([10.0, 30.0])
    assert list(two.get_ydata()) == pytest.approx([30.0, 60.0])  # mean of the two seeds, in percent
    assert len(ax.collections) == 1  # the band of "two"; "one" has a line only
    greedy = next(a for a in fig.axes if a.get_title() == "eval success, greedy (%)")
    assert not greedy.get_lines()  # not logged


def test_missing_folder_or_metrics_raise(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="runs"):
        compare_experiment(tmp_path / "nope")
    (tmp_path / "runs" / "drbot" / "seed0").mkdir(parents=True)  # a run that has logged nothing yet
    with pytest.raises(FileNotFoundError, match="no metrics"):
        compare_experiment(tmp_path)


def test_runs_without_eval_are_reported_not_crashed(tmp_path: Path) -> None:
    write_run(tmp_path, "drbot", 0, {}, steps=3)  # the reference arm never evaluated
    write_run(tmp_path, "spear", 0, {0: 0.2, 3: 0.6}, steps=3)
    write_run(tmp_path, "spear", 1, {}, steps=3)  # one seed without eval
    (tmp_path / "runs" / "spear" / "seed2").mkdir()  # not started yet
    paths = compare_experiment(tmp_path)
    result = json.loads(paths["json"].read_text())
    assert result["arms"]["drbot"]["sampled"]["final"] is None
    assert result["arms"]["spear"]["n_seeds"] == 2
    assert result["arms"]["spear"]["sampled"]["final"] == {"mean": pytest.approx(60.0), "half_width": None, "n": 1}
    assert result["difference_vs_reference"]["spear"]["mean_diff_pts"] is None
    md = paths["md"].read_text()
    assert "| drbot | 1 | 3 | n/a | no eval | no eval |" in md
    assert "| 60.0 (n=1) |" in md
    assert "- drbot: no sampled eval logged (val/success_rate)" in md
    assert "- spear: seed1 logged no sampled eval" in md
    assert "- spear/seed2: no metrics logged yet, left out" in md
    assert "- spear: n/a" in md
