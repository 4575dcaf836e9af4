"""Metrics sinks: JSONL always, TensorBoard, Weights & Biases when installed and asked for, and a
console progress bar with ETA and the live success rate and entropy.

A run's ``metrics.jsonl`` holds one JSON object per training step (``{"step": t, ...}``). On resume,
lines of steps after the resumed checkpoint are dropped first, so the file reads as one
uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

METRICS_FILE = "metrics.jsonl"
SINKS = ("jsonl", "tensorboard", "wandb", "console")


class MetricsSink(Protocol):
    def log(self, step: int, metrics: dict[str, float]) -> None: ...

    def close(self) -> None: ...


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class JsonlSink:
    """One line per step, flushed at once so that a killed run keeps every logged step."""

    def __init__(self, run_dir: str | Path, resume_step: int | None = None) -> None:
        self.path = Path(run_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            truncate_after(self.path, resume_step)
        self._file = self.path.open("a")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        record = {"step": step, **{k: _finite_or_none(v) for k, v in metrics.items() if k != "step"}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def truncate_after(path: Path, step: int) -> None:
    """Keep only the records of steps <= ``step`` (and no half-written last line), atomically."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if int(record.get("step", 0)) <= step:
            kept.append(line)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept))
    os.replace(tmp, path)


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl (a half-written last line is skipped)."""
    path = Path(run_dir) / METRICS_FILE
    records = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class TensorBoardSink:
    def __init__(self, run_dir: str | Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:  # tensorboard not installed
            raise ImportError("the tensorboard sink needs `pip install tensorboard`") from err
        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    def __init__(self, run_dir: str | Path, project: str, name: str, config: dict[str, Any]) -> None:
        try:
            import wandb
        except ImportError as err:
            raise ImportError("the wandb sink needs `pip install wandb` (and a login)") from err
        self.run = wandb.init(project=project, name=name, config=config, dir=str(run_dir))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


class ConsoleProgress:
    """A rich progress bar: steps done, ETA, and the live success rate, entropy and replay size."""

    FIELDS = (("episode/success_rate", "success", "{:.2f}"), ("rollout/entropy", "entropy", "{:.3f}"),
              ("trajectory_sft_buffersize", "buffer", "{:.0f}"), ("time/step", "s/step", "{:.1f}"))  # fmt: skip

    def __init__(self, total_steps: int, first_step: int = 0, description: str = "train") -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[live]}"),
        )  # fmt: skip
        self.task = self.progress.add_task(description, total=total_steps, completed=first_step, live="")
        self.progress.start()

    def log(self, step: int, metrics: dict[str, float]) -> None:
        live = "  ".join(
            f"{title} {fmt.format(metrics[key])}" for key, title, fmt in self.FIELDS if key in metrics
        )
        self.progress.update(self.task, completed=step, live=live)

    def status(self, text: str) -> None:
        """Show ``text`` in the live field (work before the first step, like the SFT warm-up)."""
        self.progress.update(self.task, live=text)

    def close(self) -> None:
        self.progress.stop()


class MetricsLogger:
    """Fans each step's metrics out to every sink."""

    def __init__(self, sinks: Sequence[MetricsSink]) -> None:
        self.sinks = list(sinks)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for sink in self.sinks:
            sink.log(step, metrics)

    def status(self, text: str) -> None:
        """A transient message for the sinks that show one (the progress bar); not a metric."""
        for sink in self.sinks:
            if hasattr(sink, "status"):
                sink.status(text)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def build_logger(
    names: Sequence[str],
    run_dir: str | Path,
    total_steps: int,
    resume_step: int | None,
    project: str = "spear_engine",
    run_name: str = "run",
    config: dict[str, Any] | None = None,
) -> MetricsLogger:
    """The sinks named in ``trainer.logger``; JSONL is always on."""
    unknown = [n for n in names if n not in SINKS]
    if unknown:
        raise ValueError(f"unknown logger(s) {unknown}; available: {', '.join(SINKS)}")
    sinks: list[MetricsSink] = [JsonlSink(run_dir, resume_step)]
    if "tensorboard" in names:
        sinks.append(TensorBoardSink(run_dir))
    if "wandb" in names:
        sinks.append(WandbSink(run_dir, project, run_name, config or {}))
    if "console" in names:
        sinks.append(ConsoleProgress(total_steps, resume_step or 0))
    return MetricsLogger(sinks)
