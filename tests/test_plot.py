"""``spear plot``: the title counts training steps (the SFT warm-up is logged as step 0), and the panels
draw the logged values."""

from __future__ import annotations

from pathlib import Path

import pytest

from spear_engine.metrics import JsonlSink, read_metrics
from spear_engine.plot import curves_figure, plot_run


def write_run(run: Path, steps: int, sft: bool) -> list[float]:
    """A metrics.jsonl as the trainer writes it: the SFT warm-up (if any) as step 0, then steps 1..steps."""
    sink = JsonlSink(run)
    if sft:
        sink.log(0, {"sft/nll": 2.5, "time/sft": 3.0})
    rates = [0.125, 0.625, 0.0, 0.5, 0.25][:steps]
    for t, rate in enumerate(rates, start=1):
        sink.log(t, {"episode/success_rate": rate, "time/step": 10.0 + t, "rollout/entropy": 1.0 / t})
    sink.close()
    return rates


@pytest.mark.parametrize(("steps", "sft", "title"), [
    (3, True, "run: 3 steps + SFT warm-up"),  # the quickstart shape: 4 records, 3 steps
    (3, False, "run: 3 steps"),
    (1, True, "run: 1 step + SFT warm-up"),
])  # fmt: skip
def test_title_counts_training_steps(tmp_path: Path, steps: int, sft: bool, title: str) -> None:
    run = tmp_path / "run"
    rates = write_run(run, steps, sft)
    records = read_metrics(run)
    assert len(records) == steps + sft
    fig = curves_figure(records, run.name)
    assert fig.get_suptitle() == title
    success = next(ax for ax in fig.axes if ax.get_title() == "success rate")
    (line,) = success.get_lines()  # train only: no val/success_rate logged
    assert list(line.get_xdata()) == list(range(1, steps + 1))
    assert list(line.get_ydata()) == rates
    png = plot_run(run)
    assert png == run / "curves.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_resumed_run_counts_each_step_once(tmp_path: Path) -> None:
    run = tmp_path / "run"
    write_run(run, 4, sft=True)
    JsonlSink(run, resume_step=2).close()  # a resume from the step-2 checkpoint drops steps 3 and 4 ...
    sink = JsonlSink(run)
    for t in (3, 4):  # ... and the resumed run logs them again
        sink.log(t, {"episode/success_rate": 1.0})
    sink.close()
    assert curves_figure(read_metrics(run), "run").get_suptitle() == "run: 4 steps + SFT warm-up"
