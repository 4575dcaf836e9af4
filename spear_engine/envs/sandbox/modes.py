"""What isolation this machine offers: the modes, probing them once, and the commands that enter one.

``root`` (util-linux ``unshare`` + ``setpriv`` under a root parent), ``userns`` (an unprivileged user
namespace) and ``python`` (no namespaces); the package docstring says what each enforces. A mode is
offered only when a trivial program actually runs in it: the caller supplies that trial, so this
module starts no process itself.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass

ISOLATION_MODES = ("root", "userns", "python")
"""Strongest first."""


@dataclass(frozen=True)
class Isolation:
    """How the sandbox isolates code on this machine (see the package docstring)."""

    mode: str
    unshare: str | None = None
    setpriv: str | None = None
    read_cap: bool = False
    """root mode only: the sandbox uid keeps CAP_DAC_READ_SEARCH to reach the interpreter."""


_probe_lock = threading.Lock()
_probed: dict[str, Isolation] = {}


def probe(works: Callable[[Isolation], bool], child_program: str) -> dict[str, Isolation]:
    """The modes that work here, by name (probed once per process: ``works`` runs a trivial program).

    ``child_program`` is the file the interpreter runs: in root mode an unrelated uid must read it.
    """
    with _probe_lock:
        if _probed:
            return dict(_probed)
        unshare, setpriv = shutil.which("unshare"), shutil.which("setpriv")
        candidates = [Isolation("python")]
        if unshare:
            candidates.append(Isolation("userns", unshare=unshare, setpriv=setpriv))
        if unshare and setpriv and os.geteuid() == 0:
            read_cap = not _others_can_read_python(child_program)
            candidates.append(Isolation("root", unshare, setpriv, read_cap=read_cap))
        for iso in candidates:
            if works(iso):
                _probed[iso.mode] = iso
        return dict(_probed)


def select(mode: str | None, works: Callable[[Isolation], bool], child_program: str) -> Isolation:
    """``mode`` if it works here, or the strongest that does when ``mode`` is None (see :func:`probe`)."""
    if mode is not None and mode not in ISOLATION_MODES:
        raise ValueError(f"unknown sandbox isolation mode '{mode}'; expected one of {', '.join(ISOLATION_MODES)}")
    probed = probe(works, child_program)
    if mode is None:  # if even the plain interpreter failed its probe, runs will report why as text
        return next((probed[m] for m in ISOLATION_MODES if m in probed), Isolation("python"))
    if mode not in probed:
        raise ValueError(f"sandbox isolation mode '{mode}' does not work on this machine")
    return probed[mode]


def _others_can_read_python(child_program: str) -> bool:
    """Whether an unrelated uid can traverse to and read the interpreter's directories and the child program."""
    import sysconfig

    dirs = {sys.prefix, sys.base_prefix, sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"]}
    dirs.add(os.path.dirname(os.path.realpath(sys.executable)))
    program = os.path.realpath(child_program)
    try:
        if not os.stat(program).st_mode & 0o004:
            return False
    except OSError:
        return False
    if not _others_can_traverse(os.path.dirname(program), set()):
        return False
    return all(_others_can_traverse(os.path.realpath(directory), dirs) for directory in dirs)


def _others_can_traverse(path: str, listable: set[str]) -> bool:
    """Every directory from ``path`` up to / is searchable by others (and readable where in ``listable``)."""
    while True:
        try:
            mode = os.stat(path).st_mode
        except OSError:
            return False
        if not mode & 0o001 or (path in listable and not mode & 0o004):
            return False
        if path == "/":
            return True
        path = os.path.dirname(path)


def wrapper_argv(iso: Isolation, uid: int | None) -> list[str]:
    """Commands that enter the namespaces and drop privileges before exec'ing the interpreter."""
    namespaces = ["--net", "--pid", "--fork", "--kill-child", "--mount", "--mount-proc"]
    if iso.mode == "root":
        caps = "-all,+dac_read_search" if iso.read_cap else "-all"
        drop = [iso.setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", f"--inh-caps={caps}"]
        drop += [f"--bounding-set={caps}", "--no-new-privs"]
        if iso.read_cap:
            drop.append(f"--ambient-caps={caps}")
        return [iso.unshare, *namespaces, "--", *drop, "--"]
    if iso.mode == "userns":
        drop = [iso.setpriv, "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--"] if iso.setpriv else []
        return [iso.unshare, "--user", "--map-root-user", *namespaces, "--", *drop]
    return []


def nproc_limit(iso: Isolation, max_processes: int) -> int:
    """RLIMIT_NPROC counts every task of the uid: a fresh uid/namespace starts at 1, else at the user's count."""
    if iso.mode in ("root", "userns"):
        return max_processes
    return _tasks_of_uid(os.getuid()) + max_processes


def _tasks_of_uid(uid: int) -> int:
    count = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as status:
                fields = dict(line.split(":", 1) for line in status if ":" in line)
        except OSError:
            continue
        if int(fields.get("Uid", "-1").split()[0]) == uid:
            count += int(fields.get("Threads", "1"))
    return count
