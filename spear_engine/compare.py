"""``spear compare``: the arms of a matched experiment side by side, across seeds.

An experiment folder holds ``runs/<arm>/seed<k>/metrics.jsonl`` (one JSON object per line, several may
share a step) and optionally ``experiment.yaml``, whose ``arms:`` (a list or a mapping) gives the arms'
order; without it the arms are sorted. :func:`compare_experiment` writes, next to it (or to ``out``):

- ``compare.png``: for each arm, the mean over seeds of the curves a reader compares (eval success
  sampled and greedy, train success, entropy, replay buffer, c(t), tool calls, seconds per step), with a
  shaded 95% t-interval band wherever at least two seeds logged the step (one seed: the line only);
- ``results.md``: a table per arm (seeds, steps done, final eval success, area under the eval curve,
  median seconds per step, step-time overhead vs the reference arm) and the difference of each arm's
  final sampled success from the reference arm's. A run's ``machines.jsonl`` (written by ``spear
  experiment``: the machine of each stage, so a resumed run may span two) says where each step ran; the
  overhead compares only steps that the arm and the reference ran on the same kind of machine, and a
  table lists which steps ran where when there were several;
- ``results.json``: the same numbers (success in percent points, ``null`` where not defined).

Partial runs are reported as they are: an arm's final eval is read at the last eval step that all of
its seeds reached, and when the arms stopped at different steps they are compared at the last eval step
every run has, and the report names that step. Intervals are Student's t over seeds (n - 1 df).

The stages, one module each: :mod:`~spear_engine.compare_runs` reads the runs,
:mod:`~spear_engine.compare_stats` holds the statistics over seeds, :mod:`~spear_engine.compare_summary`
computes the numbers, :mod:`~spear_engine.compare_report` writes them as markdown and
:mod:`~spear_engine.compare_plot` draws the figure.
"""

from __future__ import annotations

import json
from pathlib import Path

from spear_engine.compare_plot import compare_figure
from spear_engine.compare_report import results_markdown
from spear_engine.compare_runs import listed_arms, load_runs
from spear_engine.compare_summary import summarize, to_json

__all__ = ["compare_experiment", "compare_figure", "load_runs", "results_markdown", "summarize", "to_json"]


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
