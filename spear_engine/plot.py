"""``spear plot``: the curves a user watches, from a run's metrics.jsonl, as one PNG."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from spear_engine.metrics import read_metrics

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PANELS = [
    ("success rate", [("episode/success_rate", "train"), ("val/success_rate", "eval, sampled"),
                      ("val_greedy/success_rate", "eval, greedy")]),
    ("reward", [("episode/reward/mean", "episode reward"), ("critic/advantages/mean", "mean advantage")]),
    ("entropy", [("rollout/entropy", "policy entropy (per token)")]),
    ("policy loss", [("actor/pg_loss", "on-policy"), ("actor/pg_loss_replay", "replay")]),
    ("clip fractions", [("actor/pg_clipfrac", "clip / clip-cov"), ("actor/pg_clipfrac_replay", "replay")]),
    ("schedules", [("schedule/replay_coef", "replay coef c(t)"), ("schedule/toolcall_bonus_factor", "tool bonus")]),
    ("replay buffer", [("trajectory_sft_buffersize", "rows"), ("replay/drawn_rows", "replayed")]),
    ("episode length", [("episode/length/mean", "turns"), ("episode/tool_calls/mean", "tool calls")]),
    ("step time (s)", [("time/step", "step"), ("time/rollout", "rollout"), ("time/update", "update")]),
]


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write ``<run>/curves.png`` (or ``out``) and return its path."""
    records = read_metrics(run_dir)
    if not records:
        raise FileNotFoundError(f"{Path(run_dir) / 'metrics.jsonl'} has no metrics to plot")
    fig = curves_figure(records, Path(run_dir).name)
    path = Path(out) if out is not None else Path(run_dir) / "curves.png"
    fig.savefig(path, dpi=90)
    return path


def training_steps(records: list[dict[str, Any]]) -> int:
    """The number of training steps in ``records``: distinct steps >= 1 (the SFT warm-up is logged as step 0)."""
    return len({int(r["step"]) for r in records if int(r.get("step", 0)) >= 1})


def finish_panel(ax: Any, title: str, drawn: bool) -> None:
    """Title, step axis and grid of one panel; its legend, or "not logged" when nothing was drawn."""
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")


def curves_figure(records: list[dict[str, Any]], name: str) -> Figure:
    """The panels of :data:`PANELS` over the metrics records, titled ``<name>: <n> steps``."""
    from matplotlib.figure import Figure

    cols = 3
    rows = (len(PANELS) + cols - 1) // cols
    fig = Figure(figsize=(5 * cols, 3.2 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, (title, series) in zip(axes.flat, PANELS):
        drawn = False
        for key, label in series:
            points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o" if len(points) < 30 else None, markersize=3, label=label)
                drawn = True
        finish_panel(ax, title, drawn)
    for ax in list(axes.flat)[len(PANELS) :]:
        ax.axis("off")
    steps = training_steps(records)
    warmup = " + SFT warm-up" if any(int(r.get("step", 0)) == 0 for r in records) else ""
    fig.suptitle(f"{name}: {steps} step{'' if steps == 1 else 's'}{warmup}")
    fig.tight_layout()
    return fig
