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
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import numpy as np

METRICS_FILE = "metrics.jsonl"
SINKS = ("jsonl", "tensorboard", "wandb", "console")


def episode_metrics(
    episodes: Sequence[Any], sum_over_ranks: Callable[[np.ndarray], np.ndarray] | None = None
) -> dict[str, float]:
    """Per-episode means (success, reward, length, tool calls), the longest episode and the count.
    ``sum_over_ranks`` adds up the five totals of every rank (success, reward, length, tool calls, episodes)
    so every rank reports the global means; the longest episode is this rank's."""
    stats = np.array([[e.success, e.reward, e.length, e.tool_calls, 1.0] for e in episodes], dtype=np.float64)
    totals = stats.reshape(-1, 5).sum(0)
    if sum_over_ranks is not None:
        totals = sum_over_ranks(totals)
    count = max(float(totals[4]), 1.0)
    return {
        "episode/success_rate": float(totals[0]) / count,
        "episode/reward/mean": float(totals[1]) / count,
        "episode/length/mean": float(totals[2]) / count,
        "episode/length/max": float(max([e.length for e in episodes] or [0])),
        "episode/tool_calls/mean": float(totals[3]) / count,
        "episode/count": count,
    }


class StageClock:
    """Wall time of a step's stages: ``with clock("rollout"): ...`` records ``time/rollout``; ``total()``
    adds ``time/step`` (since the clock was made) and returns every timing."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.timings: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        mark = time.perf_counter()
        try:
            yield
        finally:
            self.timings[f"time/{stage}"] = time.perf_counter() - mark

    def total(self) -> dict[str, float]:
        self.timings["time/step"] = time.perf_counter() - self.start
        return dict(self.timings)


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
    """A rich progress bar: steps done, ETA, and the live success rate, entropy and replay size.

    For an interactive terminal only: written to a pipe, a file, ``nohup`` or a CI log, a live bar is
    cut to rich's 80 default columns and redrawn, so :func:`console_progress` picks :class:`PlainProgress`
    there instead."""

    FIELDS = (("episode/success_rate", "success", "{:.2f}"), ("rollout/entropy", "entropy", "{:.3f}"),
              ("trajectory_sft_buffersize", "buffer", "{:.0f}"), ("perf/mfu", "mfu", "{:.3f}"),
              ("time/step", "s/step", "{:.1f}"))  # fmt: skip

    def __init__(
        self, total_steps: int, first_step: int = 0, description: str = "train", console: Any = None
    ) -> None:
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
            TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[live]}"), console=console,
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


def _hms(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class PlainProgress:
    """Progress for output that is not a terminal: one complete line per step, flushed at once, e.g.
    ``train step 2/3  success 0.50  entropy 1.234  buffer 4  s/step 12.3  elapsed 0:00:25  eta 0:00:12``
    (``buffer`` only when self-imitation replay is on; ``-`` for a value the step did not report). The ETA
    is the mean time of the steps this process ran times the steps left. Status messages (the SFT warm-up,
    reported once per SFT optimizer step) print at most once every ``status_interval_s`` seconds; the first
    always prints, and the warm-up's result (logged as step 0) is one summary line."""

    def __init__(self, total_steps: int, first_step: int = 0, description: str = "train", file: Any = None,
                 status_interval_s: float = 10.0, clock: Any = None) -> None:  # fmt: skip
        self.total, self.description, self._file = total_steps, description, file
        self.status_interval_s = status_interval_s
        self._clock = clock or time.monotonic
        self._origin, self._origin_step = self._clock(), first_step
        self._last_status: float | None = None

    def _write(self, line: str) -> None:
        out = self._file if self._file is not None else sys.stdout  # sys.stdout at call time (pytest capture)
        out.write(line + "\n")
        out.flush()

    def log(self, step: int, metrics: dict[str, float]) -> None:
        now = self._clock()
        if any(key.startswith("sft/") for key in metrics):  # the SFT warm-up, logged as step 0
            sft = [f"nll {metrics['sft/nll']:.3f}"] if "sft/nll" in metrics else []
            took = [f"time {_hms(metrics['time/sft'])}"] if "time/sft" in metrics else []
            self._write("  ".join([f"{self.description} SFT warm-up done", *sft, *took]))
            self._origin, self._origin_step = now, step  # the ETA counts RL steps only
            return

        def value(key: str, fmt: str) -> str:
            v = metrics.get(key)
            return fmt.format(v) if isinstance(v, (int, float)) and math.isfinite(v) else "-"

        per_step = (now - self._origin) / max(step - self._origin_step, 1)
        parts = [f"{self.description} step {step}/{self.total}", f"success {value('episode/success_rate', '{:.2f}')}",
                 f"entropy {value('rollout/entropy', '{:.3f}')}"]  # fmt: skip
        if "trajectory_sft_buffersize" in metrics:
            parts.append(f"buffer {value('trajectory_sft_buffersize', '{:.0f}')}")
        if "val/success_rate" in metrics:
            parts.append(f"val success {value('val/success_rate', '{:.2f}')}")
        if "perf/mfu" in metrics:
            parts += [f"mfu {value('perf/mfu', '{:.3f}')}", f"pad eff {value('perf/padding_efficiency', '{:.2f}')}"]
            if metrics.get("perf/prefix_sharing", 1.0) > 1.0:  # shared prefixes ran once: real / ran tokens
                parts.append(f"prefix share {value('perf/prefix_sharing', '{:.2f}')}x")
        seconds = metrics.get("time/step", per_step)
        parts += [f"s/step {seconds:.1f}", f"elapsed {_hms(now - self._origin)}",
                  f"eta {_hms(per_step * max(self.total - step, 0))}"]  # fmt: skip
        self._write("  ".join(parts))

    def status(self, text: str) -> None:
        now = self._clock()
        if self._last_status is not None and now - self._last_status < self.status_interval_s:
            return
        self._last_status = now
        self._write(f"{self.description}: {text}")

    def close(self) -> None:
        pass


def console_progress(total_steps: int, first_step: int = 0, description: str = "train",
                     console: Any = None) -> ConsoleProgress | PlainProgress:  # fmt: skip
    """The live bar on an interactive terminal (or Jupyter), plain lines everywhere else. ``console``: a rich
    Console to decide by and draw on (default: one on stdout; rich honours ``FORCE_COLOR``,
    ``TTY_COMPATIBLE`` and ``TTY_INTERACTIVE``)."""
    from rich.console import Console

    given = console is not None
    console = console if given else Console()
    if console.is_interactive or console.is_jupyter:
        return ConsoleProgress(total_steps, first_step, description, console=console)
    return PlainProgress(total_steps, first_step, description, file=console.file if given else None)


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
        sinks.append(console_progress(total_steps, max(resume_step or 0, 0)))
    return MetricsLogger(sinks)
