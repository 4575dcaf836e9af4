"""What machine a measurement ran on, as one short label: step times and benchmark numbers are only
comparable between runs on the same kind of CPU (or GPU) with the same number of cores. Also a run's
``machines.jsonl`` (one line per stage, written by ``spear experiment``, read by ``spear compare`` and
``spear experiment --status``): a resumed run may continue on another machine.

The CPU's marketing name alone is not enough: cloud CPUs often report a bare ``AMD EPYC``, which a Zen 4
and a Zen 5 share, so the label adds the CPU family and model numbers from ``/proc/cpuinfo``.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
MACHINES_FILE = "machines.jsonl"
"""One line per stage of a run: ``{"after_step", "machine", "torch"}``; the steps after ``after_step`` ran there."""


def _cpuinfo_fields(text: str) -> dict[str, str]:
    """The ``key: value`` lines of the first processor block of a /proc/cpuinfo text."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_model(cpuinfo_text: str | None = None) -> str:
    """``<model name> (cpu family F, model M)`` where /proc/cpuinfo says so (x86 Linux), else what
    :func:`platform.processor` says, else ``unknown CPU``."""
    if cpuinfo_text is None:
        try:
            cpuinfo_text = CPUINFO.read_text()
        except OSError:
            cpuinfo_text = ""
    fields = _cpuinfo_fields(cpuinfo_text)
    name = fields.get("model name") or platform.processor() or "unknown CPU"
    family, model = fields.get("cpu family"), fields.get("model")
    if family is not None and model is not None:
        return f"{name} (cpu family {family}, model {model})"
    return name


def gpu_name() -> str | None:
    """The first CUDA device's name when torch sees one (torch is not imported here if it was not yet)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return None
    return str(torch.cuda.get_device_name(0))


def machine_label() -> str:
    """``<cpu_model()>, <n> CPUs`` (the CPUs this process may run on) plus ``, GPU <name>`` when torch
    sees one."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    label = f"{cpu_model()}, {cpus} CPUs"
    gpu = gpu_name()
    return f"{label}, GPU {gpu}" if gpu else label


def record_machine(run_dir: Path, after_step: int) -> None:
    """Append the machine that runs the steps after ``after_step`` to the run's machines file, so that
    ``spear compare`` compares step times only between steps that ran on the same kind of machine."""
    import torch

    line = {"after_step": after_step, "machine": machine_label(), "torch": torch.__version__}
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / MACHINES_FILE).open("a") as out:
        out.write(json.dumps(line) + "\n")


def machine_spans(run_dir: Path) -> list[tuple[int, str]]:
    """``(after_step, machine)`` per stage of a run, by step, from its machines file; empty without one.
    Raises ValueError naming the file and line when a line is not such a record."""
    path = run_dir / MACHINES_FILE
    if not path.is_file():
        return []
    spans = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            spans.append((int(entry["after_step"]), str(entry["machine"])))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{number}: expected {{\"after_step\": int, \"machine\": str}}: {exc}") from exc
    return sorted(spans)
