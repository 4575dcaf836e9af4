"""Crash-safe checkpoints: write to a temporary folder, fsync, rename; keep the last K; checksums.

A checkpoint is a folder ``<run>/checkpoints/step_00000012/`` holding ``state_rank<r>.pt`` per rank
(everything the trainer needs to continue exactly: model, optimizer, replay index bytes, RNG states,
counters, config)
plus any extra files a backend writes (a DeepSpeed ZeRO-3 shard folder), and ``manifest.json`` with the
SHA-256 and size of every file. The folder only appears under its final name after all its files and
the manifest are on disk, so a kill at any point leaves the previous checkpoint intact; a truncated
or altered file fails the checksum with a clear error. Saving a step that already has a checkpoint moves
the old folder aside (``.replaced-step_…``) before renaming the new one in, so a kill between the two
renames leaves the old copy, which :func:`latest_checkpoint` moves back.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

import torch

MANIFEST = "manifest.json"
PREFIX = "step_"
REPLACED = ".replaced-"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupted."""


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def state_file(rank: int) -> str:
    return f"state_rank{rank}.pt"


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    state: dict[str, Any],
    keep_last: int = 3,
    write_extra: Callable[[Path], None] | None = None,
    rank: int = 0,
    barrier: Callable[[], None] | None = None,
) -> Path:
    """Atomically write the checkpoint of ``step``; returns its folder.

    Every rank calls this with its own ``state`` (written as ``state_rank<r>.pt``); ``write_extra(folder)``
    may add files (e.g. DeepSpeed shards; a collective) before rank 0 writes the manifest, fsyncs and
    renames the folder into place. ``barrier`` synchronises the ranks (None for one process).
    """
    sync = barrier or (lambda: None)
    root = checkpoint_dir(run_dir)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".tmp-{PREFIX}{step:08d}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # left over by a run killed while writing this step
            shutil.rmtree(tmp)
        tmp.mkdir()
    sync()
    torch.save(state, tmp / state_file(rank))
    if write_extra is not None:
        write_extra(tmp)
    sync()
    if rank == 0:
        manifest = {
            "format": FORMAT_VERSION,
            "step": step,
            "files": {
                str(p.relative_to(tmp)): {"sha256": _sha256(p), "bytes": p.stat().st_size} for p in _files(tmp)
            },
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        for path in [*_files(tmp), tmp / MANIFEST]:
            _fsync_path(path)
        for folder in sorted({p.parent for p in _files(tmp)} | {tmp}, key=lambda p: -len(p.parts)):
            _fsync_path(folder)
        if final.exists():  # the same step saved again (e.g. after a resume): replace it, never leaving none
            aside = root / f"{REPLACED}{final.name}"
            if aside.exists():
                shutil.rmtree(aside)
            os.rename(final, aside)
        os.rename(tmp, final)
        _fsync_path(root)
        prune(run_dir, keep_last)
    sync()
    return final


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders, oldest first (temporary folders of interrupted writes are ignored)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def prune(run_dir: str | Path, keep_last: int) -> None:
    """Remove all but the newest ``keep_last`` checkpoints, and leftovers of interrupted writes."""
    recover_replaced(run_dir)
    root = checkpoint_dir(run_dir)
    for leftover in [*root.glob(f".tmp-{PREFIX}*"), *root.glob(f"{REPLACED}{PREFIX}*")]:
        shutil.rmtree(leftover, ignore_errors=True)
    if keep_last > 0:
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)


def recover_replaced(run_dir: str | Path) -> None:
    """Move back a checkpoint that a replacing write had moved aside when it was killed before renaming the
    new one into place (the old copy is complete; a new copy in place makes it a leftover for prune)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return
    for aside in root.glob(f"{REPLACED}{PREFIX}*"):
        final = root / aside.name.removeprefix(REPLACED)
        if not final.exists():
            with suppress(OSError):  # another rank moved it first
                os.rename(aside, final)


def verify_checkpoint(folder: str | Path) -> dict[str, Any]:
    """Check the manifest and every file's size and checksum; returns the manifest."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{folder} is not a complete checkpoint (no {MANIFEST})")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{manifest_path} is corrupted ({err})") from err
    for name, entry in manifest.get("files", {}).items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {folder}: file {name} is missing")
        if path.stat().st_size != entry["bytes"]:
            raise CheckpointError(
                f"checkpoint {folder}: {name} has {path.stat().st_size} bytes, expected {entry['bytes']} (truncated?)"
            )
        if _sha256(path) != entry["sha256"]:
            raise CheckpointError(f"checkpoint {folder}: {name} fails its SHA-256 checksum (corrupted)")
    return manifest


def load_checkpoint(folder: str | Path, rank: int = 0) -> dict[str, Any]:
    """Verify and load one rank's state of a checkpoint."""
    try:
        verify_checkpoint(folder)
    except CheckpointError as err:
        raise CheckpointError(f"{err}. Use another checkpoint of the run (trainer.resume=auto picks the newest one "
                              f"that verifies).") from None  # fmt: skip
    path = Path(folder) / state_file(rank)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {folder} has no state for rank {rank} (saved with fewer ranks?)")
    return torch.load(path, map_location="cpu", weights_only=False)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint that verifies; a corrupted newer one is reported and skipped."""
    recover_replaced(run_dir)
    for folder in reversed(list_checkpoints(run_dir)):
        try:
            verify_checkpoint(folder)
        except CheckpointError as err:
            print(f"spear: warning: skipping checkpoint: {err}")
            continue
        return folder
    return None


def capture_rng_state() -> dict[str, Any]:
    """The state of every global generator the trainer draws from (python, numpy, torch CPU and CUDA)."""
    import random

    import numpy as np

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
