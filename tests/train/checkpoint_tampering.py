"""What the checkpoint safety tests plant in a checkpoint: a pickle that runs a call when loaded, and a
manifest rewritten to match the tampered files (used by test_checkpoint_safety.py and its ZeRO-3 worker)."""

from __future__ import annotations

import builtins
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from spear_engine.train.checkpoint import MANIFEST


class Payload:
    """Unpickling this runs ``os.system`` (``touch marker``) or ``exec`` (which writes the marker)."""

    def __init__(self, marker: Path, kind: str = "os.system") -> None:
        self.marker, self.kind = marker, kind

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        if self.kind == "os.system":
            return os.system, (f"touch {self.marker}",)
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


def rewrite_manifest(folder: Path) -> None:
    """Correct SHA-256s and sizes for every file as it is now: the manifest proves integrity, not safety."""
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["files"] = {
        str(p.relative_to(folder)): {"sha256": hashlib.sha256(p.read_bytes()).hexdigest(), "bytes": p.stat().st_size}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))
