"""Per-call resources: a dedicated uid (root mode) and a private temporary directory, both given back."""

from __future__ import annotations

import os
import pwd
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from spear_engine.envs.sandbox.modes import Isolation

_UID_BASE = 2_100_000_000
_UID_POOL = 128


class _UidPool:
    """Unused uids handed out one per concurrent call, so sandboxes cannot touch each other."""

    def __init__(self, base: int, size: int) -> None:
        self._free = [uid for uid in range(base + size - 1, base - 1, -1) if not _uid_exists(uid)]
        self._cond = threading.Condition()

    @contextmanager
    def lease(self) -> Iterator[int]:
        with self._cond:
            while not self._free:
                self._cond.wait()
            uid = self._free.pop()
        try:
            yield uid
        finally:
            with self._cond:
                self._free.append(uid)
                self._cond.notify()


def _uid_exists(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True


_pool_lock = threading.Lock()
_pool: _UidPool | None = None


@contextmanager
def uid_lease(iso: Isolation) -> Iterator[int | None]:
    """A dedicated uid in root mode (offset by pid so that several engine processes rarely share one)."""
    global _pool
    if iso.mode != "root":
        yield None
        return
    with _pool_lock:
        if _pool is None:
            _pool = _UidPool(_UID_BASE + (os.getpid() % 8192) * _UID_POOL, _UID_POOL)
    with _pool.lease() as uid:
        yield uid


@contextmanager
def private_dir(uid: int | None) -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="spear-sandbox-")
    try:
        if uid is not None:
            os.chown(path, uid, uid)
        yield os.path.realpath(path)
    finally:
        shutil.rmtree(path, onerror=_force_remove)


def _force_remove(func: Callable[[str], object], path: str, _exc_info: object) -> None:
    """The code may have chmod-ed things read-only; make them writable and retry once."""
    try:
        os.chmod(os.path.dirname(path), 0o700)
        if os.path.isdir(path) and not os.path.islink(path):
            os.chmod(path, 0o700)
        func(path)
    except OSError:
        pass
