"""``spear plot``: the curves a user watches, from a run's metrics.jsonl, as one PNG."""

from __future__ import annotations

from pathlib import Path

from spear_engine.metrics import read_metrics

PANELS = [
    ("success rate", [("episode/success_rate", "train"), ("val/success_rate", "eval")]),
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    if not records:
        raise FileNotFoundError(f"{Path(run_dir) / 'metrics.jsonl'} has no metrics to plot")
    cols = 3
    rows = (len(PANELS) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.2 * rows), squeeze=False)
    for ax, (title, series) in zip(axes.flat, PANELS):
        drawn = False
        for key, label in series:
            points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o" if len(points) < 30 else None, markersize=3, label=label)
                drawn = True
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
    for ax in list(axes.flat)[len(PANELS) :]:
        ax.axis("off")
    fig.suptitle(f"{Path(run_dir).name}: {len(records)} steps")
    fig.tight_layout()
    path = Path(out) if out is not None else Path(run_dir) / "curves.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
