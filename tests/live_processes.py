"""Find live processes by their command line: what a sandbox left behind, wherever it was re-parented to."""

from __future__ import annotations

from pathlib import Path


def processes_running(fragment: str) -> set[int]:
    """The pids of live processes whose command line contains ``fragment`` (zombies have none)."""
    found = set()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if fragment.encode() in cmdline.read_bytes():
                found.add(int(cmdline.parent.name))
        except OSError:
            continue
    return found
