"""Crash-safe checkpoints: write to a temporary folder, fsync, rename; keep the last K; checksums.

A checkpoint is a folder ``<run>/checkpoints/step_00000012/`` holding, per rank, everything the trainer
needs to continue exactly (model, optimizer, replay index bytes, RNG states, counters, config) in two files:
``state_rank<r>.safetensors`` with every tensor (model weights, optimizer moments, torch RNG states), numpy
array (numpy's RNG key) and bytes object (the replay index), and ``state_rank<r>.pt``, the small rest of the
structure (dicts, lists, tuples, numbers, strings) with a placeholder such as ``{"__spear_tensor__": key}``
where each of those was. Loading never unpickles arbitrary objects: the safetensors file is raw tensor data,
and ``state_rank<r>.pt`` is read with ``torch.load(weights_only=True)`` and no extra allowed type, so a file
that pickles anything else (a call to ``os.system``, say) is refused with a :class:`CheckpointError` before
any of it runs, whatever its checksum. A checkpoint of the old format 1 (one pickled ``state_rank<r>.pt``
that only a full unpickle can read) is refused without being unpickled.
A backend may add its own files (a DeepSpeed ZeRO-3 shard folder, loaded weights-only by the backend), and
``manifest.json`` holds the SHA-256 and size of every file. The folder only appears under its final name after
all its files and the manifest are on disk, so a kill at any point leaves the previous checkpoint intact; a
truncated or altered file fails the checksum with a clear error. Saving a step that already has a checkpoint
moves the old folder aside (``.replaced-step_…``) before renaming the new one in, so a kill between the two
renames leaves the old copy, which :func:`latest_checkpoint` moves back.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from collections import OrderedDict
from collections.abc import Callable, Iterable
from contextlib import suppress
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch

MANIFEST = "manifest.json"
PREFIX = "step_"
REPLACED = ".replaced-"
FORMAT_VERSION = 2  # 2: tensors in safetensors, the rest loaded weights-only; 1: one pickled state_rank<r>.pt
TENSOR_TAG = "__spear_tensor__"  # {TENSOR_TAG: key}: the tensor ``key`` of the rank's safetensors file
NDARRAY_TAG = "__spear_ndarray__"  # {NDARRAY_TAG: key}: the same, given back as a numpy array
BYTES_TAG = "__spear_bytes__"  # {BYTES_TAG: key}: the same (uint8), given back as bytes (e.g. the replay index)


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
    """The rank's state without its tensors (plain data, read with ``torch.load(weights_only=True)``)."""
    return f"state_rank{rank}.pt"


def tensor_file(rank: int) -> str:
    """The rank's tensors (safetensors)."""
    return f"state_rank{rank}.safetensors"


_PLAIN = (type(None), bool, int, float, complex, str, bytearray, torch.Size, torch.dtype, torch.device)
_TAGS = (TENSOR_TAG, NDARRAY_TAG, BYTES_TAG)


class _Packer:
    """Splits a state into tensors (by key) and a plain-data skeleton with placeholders where they were."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self._keys: dict[int, str] = {}  # id of a tensor already stored -> its key (aliases stay aliases)
        self._storages: set[int] = set()

    def pack(self, value: Any, path: str) -> Any:
        if type(value) in _PLAIN:
            return value
        if isinstance(value, np.generic):  # a numpy scalar: its python value
            return value.item()
        if type(value) is bytes:  # raw in the tensor file (a weights-only load refuses an empty bytes object)
            data = torch.frombuffer(bytearray(value), dtype=torch.uint8) if value else torch.empty(0, dtype=torch.uint8)
            return {BYTES_TAG: self._store(data, path, key_of=value)}
        if isinstance(value, torch.Tensor):
            return {TENSOR_TAG: self._store(value, path)}
        if isinstance(value, np.ndarray):
            if value.dtype.kind not in "biuf":
                raise TypeError(f"checkpoint state {path}: a numpy array of dtype {value.dtype} cannot be saved")
            array = np.ascontiguousarray(value, dtype=value.dtype.newbyteorder("="))
            return {NDARRAY_TAG: self._store(torch.from_numpy(array), path, key_of=value)}
        if isinstance(value, dict):
            for key in value:
                if type(key) not in (str, int, float, bool, type(None)):
                    raise TypeError(f"checkpoint state {path}: key {key!r} of type {type(key).__name__} cannot be saved")
                if key in _TAGS:
                    raise ValueError(f"checkpoint state {path}: the key {key!r} is reserved")
            packed = (OrderedDict if isinstance(value, OrderedDict) else dict)(
                (k, self.pack(v, f"{path}/{k}")) for k, v in value.items()
            )
            if isinstance(value, OrderedDict) and hasattr(value, "_metadata"):  # a module state_dict's versions
                packed._metadata = self.pack(value._metadata, f"{path}/_metadata")  # type: ignore[attr-defined]
            return packed
        if isinstance(value, (list, tuple)):
            items = [self.pack(v, f"{path}/{i}") for i, v in enumerate(value)]
            return items if isinstance(value, list) else tuple(items)
        raise TypeError(f"checkpoint state {path}: a {type(value).__module__}.{type(value).__qualname__} cannot be "
                        f"saved (only tensors, numpy arrays and plain data: dict, list, tuple, numbers, str, bytes)")  # fmt: skip

    def _store(self, tensor: torch.Tensor, path: str, key_of: Any = None) -> str:
        ident = id(tensor if key_of is None else key_of)
        if ident in self._keys:
            return self._keys[ident]
        if tensor.layout != torch.strided or tensor.is_quantized:
            raise TypeError(f"checkpoint state {path}: a {tensor.layout} tensor cannot be saved")
        t = tensor.detach().to("cpu").resolve_conj().resolve_neg()
        storage = t.untyped_storage()
        if storage.nbytes() and (
            storage.data_ptr() in self._storages or not t.is_contiguous() or storage.nbytes() != t.nbytes
        ):  # safetensors stores no views or shared memory (e.g. tied weights): a copy of its own
            t = t.clone(memory_format=torch.contiguous_format)
        if t.untyped_storage().nbytes():
            self._storages.add(t.untyped_storage().data_ptr())
        key = path.lstrip("/") or "tensor"
        while key in self.tensors:
            key += "'"
        self.tensors[key] = t
        self._keys[ident] = key
        return key


def _unpack(value: Any, tensors: dict[str, torch.Tensor], where: Path) -> Any:
    if type(value) in (dict, OrderedDict):
        if len(value) == 1 and next(iter(value)) in _TAGS:
            tag, key = next(iter(value.items()))
            if not isinstance(key, str) or key not in tensors:
                raise CheckpointError(f"checkpoint {where}: tensor {key!r} is missing from its safetensors file")
            if tag == BYTES_TAG:
                return tensors[key].numpy().tobytes()
            return tensors[key].numpy() if tag == NDARRAY_TAG else tensors[key]
        out = type(value)((k, _unpack(v, tensors, where)) for k, v in value.items())
        if hasattr(value, "_metadata"):
            out._metadata = value._metadata  # type: ignore[attr-defined]
        return out
    if type(value) in (list, tuple):
        items = [_unpack(v, tensors, where) for v in value]
        return items if type(value) is list else tuple(items)
    return value


def safe_torch_load(path: str | Path, allowed_globals: Iterable[Any] = (), map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``: tensors and plain data only, plus exactly ``allowed_globals`` (for
    this call only). A file that pickles anything else raises :class:`CheckpointError` and none of it runs."""
    allowed = list(allowed_globals)
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        try:  # what it pickles, read from its opcodes (nothing is executed)
            known = {f"{g.__module__}.{g.__qualname__}" for g in allowed}
            names = sorted(set(torch.serialization.get_unsafe_globals_in_checkpoint(path)) - known)
        except Exception:  # the listing is only a detail of the message
            names = []
        detail = f"it pickles {', '.join(names[:5])}" if names else "refused by torch.load(weights_only=True)"
        raise CheckpointError(
            f"{path} holds objects other than tensors and plain data ({detail}); spear_engine never unpickles "
            f"arbitrary objects (that could run code), so this checkpoint is refused: it was not written by "
            f"spear_engine, or it has been tampered with"
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError) as err:
        raise CheckpointError(f"{path} cannot be read ({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None


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

    Every rank calls this with its own ``state`` (tensors, numpy arrays and plain data; written as
    ``state_rank<r>.safetensors`` and ``state_rank<r>.pt``, see the module docstring); ``write_extra(folder)``
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
    packer = _Packer()
    skeleton = packer.pack(state, "")
    safetensors.torch.save_file(packer.tensors, str(tmp / tensor_file(rank)), metadata={"spear_format": str(FORMAT_VERSION)})
    torch.save(skeleton, tmp / state_file(rank))
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
    """Verify and load one rank's state of a checkpoint; nothing in it is unpickled but tensors and plain data."""
    try:
        manifest = verify_checkpoint(folder)
    except CheckpointError as err:
        raise CheckpointError(f"{err}. Use another checkpoint of the run (trainer.resume=auto picks the newest one "
                              f"that verifies).") from None  # fmt: skip
    folder = Path(folder)
    version = manifest.get("format")
    if version != FORMAT_VERSION:
        if isinstance(version, int) and version > FORMAT_VERSION:
            raise CheckpointError(f"checkpoint {folder} has format {version}, newer than this spear_engine reads "
                                  f"({FORMAT_VERSION}); upgrade spear_engine to resume it")  # fmt: skip
        raise CheckpointError(
            f"checkpoint {folder} has the old format {version} (a pickled {state_file(rank)} that only a full unpickle "
            f"can read, which can run arbitrary code), so it is refused and was not unpickled; this spear_engine reads "
            f"format {FORMAT_VERSION} (tensors in safetensors, the rest loaded weights-only). Start the run afresh "
            f"(another trainer.run_name), or resume it with the spear_engine version that wrote it"
        )
    names = (tensor_file(rank), state_file(rank))
    if not all((folder / name).is_file() for name in names):
        raise CheckpointError(f"checkpoint {folder} has no state for rank {rank} (saved with fewer ranks?)")
    if not all(name in manifest.get("files", {}) for name in names):
        raise CheckpointError(f"checkpoint {folder}: the state of rank {rank} is not covered by its {MANIFEST}")
    try:
        mapped = safetensors.torch.load_file(str(folder / tensor_file(rank)), device="cpu")
        # Views of one copy-on-write map of the file: a tensor kept for the whole run (an Adam moment) would
        # pin the map of every tensor, model weights included. Copies of their own let it go.
        tensors = {key: value.clone() for key, value in mapped.items()}
        del mapped
    except Exception as err:  # safetensors raises its own error type for a malformed file
        raise CheckpointError(f"checkpoint {folder}: {tensor_file(rank)} is not a valid safetensors file ({err})") from None
    skeleton = safe_torch_load(folder / state_file(rank))
    try:
        return _unpack(skeleton, tensors, folder)
    except (TypeError, ValueError, RuntimeError) as err:  # a placeholder of the wrong kind (a crafted file)
        raise CheckpointError(f"checkpoint {folder}: {state_file(rank)} does not match its tensors ({err})") from None


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
