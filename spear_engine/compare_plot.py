"""The figure of ``spear compare``: per arm, the mean over seeds of the curves a reader compares, with a
shaded 95% t-interval band wherever at least two seeds logged the step."""

from __future__ import annotations

from typing import TYPE_CHECKING

from spear_engine.compare_runs import Runs, seed_curve
from spear_engine.compare_summary import EVAL_KEYS, TIME_KEY
from spear_engine.plot import finish_panel

if TYPE_CHECKING:
    from matplotlib.figure import Figure

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
