"""Start the child program, feed it the limits, read its output with caps, and explain how it ended.

The child is ``child.py`` beside this file, run by path with ``python -I -u`` behind the isolation
mode's wrapper (:func:`~spear_engine.envs.sandbox.modes.wrapper_argv`), in a fresh private directory,
with a clean environment, in its own process group that is SIGKILLed when the call ends.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import time
from contextlib import suppress
from dataclasses import dataclass

from spear_engine.envs.sandbox.modes import (
    ISOLATION_MODES,
    Isolation,
    nproc_limit,
    probe,
    select,
    wrapper_argv,
)
from spear_engine.envs.sandbox.result import SandboxResult
from spear_engine.envs.sandbox.workspace import private_dir, uid_lease

MAX_CODE_BYTES = 100_000
"""Longer code is refused (it travels on the command line; Linux caps one argument at 128 KiB)."""

CHILD_PROGRAM = os.path.join(os.path.dirname(os.path.realpath(__file__)), "child.py")
"""The program the sandboxed interpreter runs (by path; it imports only the standard library)."""

_EXIT_CPU = 152  # 128 + SIGXCPU: the child's own SIGXCPU handler exits with this code
_EXIT_WALL = 124  # the child's watchdog exits with this code past the deadline plus a grace (child.py)
WALL_GRACE_S = 2.0
"""The child ends itself this long after the parent's deadline, should the parent not have killed it."""


def run_python(
    code: str,
    timeout_s: float = 5.0,
    cpu_s: int = 5,
    memory_mb: int = 512,
    max_output_bytes: int = 16384,
    max_processes: int = 16,
    max_file_mb: int = 16,
    isolation_mode: str | None = None,
    *,
    audit_guard: bool = True,
) -> SandboxResult:
    """Run ``code`` in a fresh sandboxed interpreter; safe to call from several threads at once.

    ``isolation_mode`` forces a weaker mode than the best one available (tests use it); None
    picks the strongest that works here. ``audit_guard=False`` leaves out the in-process audit
    hook so that tests can check the kernel-enforced layers on their own; never use it otherwise.
    """
    if len(code.encode("utf-8", "surrogatepass")) > MAX_CODE_BYTES:
        return SandboxResult("", "", None, killed_reason=f"refused: code longer than {MAX_CODE_BYTES} bytes")
    if "\x00" in code:
        return SandboxResult("", "", None, killed_reason="refused: code contains a NUL character")
    iso = _select_isolation(isolation_mode)
    limits = _Limits(timeout_s, max(1, int(cpu_s)), memory_mb, max_output_bytes, max_processes, max_file_mb, audit_guard)
    try:
        with uid_lease(iso) as uid, private_dir(uid) as workdir:
            return _run(code, iso, limits, uid, workdir)
    except OSError as err:  # could not create the directory or start the process
        return SandboxResult("", "", None, killed_reason=f"sandbox error: {err}")


def isolation() -> Isolation:
    """The strongest isolation that works on this machine (probed once, by running a trivial program)."""
    return _select_isolation(None)


def available_isolation_modes() -> list[str]:
    """Every mode that works here, strongest first (``python`` always works)."""
    probed = probe(_works, CHILD_PROGRAM)
    return [mode for mode in ISOLATION_MODES if mode in probed]


def _select_isolation(mode: str | None) -> Isolation:
    return select(mode, _works, CHILD_PROGRAM)


def _works(iso: Isolation) -> bool:
    limits = _Limits(20.0, 10, 1024, 4096, 16, 1)
    try:
        with uid_lease(iso) as uid, private_dir(uid) as workdir:
            result = _run("import json\nprint('sandbox-ok')", iso, limits, uid, workdir)
    except OSError:
        return False
    return result.ok and result.stdout.strip() == "sandbox-ok"


@dataclass(frozen=True)
class _Limits:
    timeout_s: float
    cpu_s: int
    memory_mb: int
    max_output_bytes: int
    max_processes: int
    max_file_mb: int
    audit_guard: bool = True


def _run(code: str, iso: Isolation, limits: _Limits, uid: int | None, workdir: str) -> SandboxResult:
    config = {
        "root": workdir,
        "cpu_s": limits.cpu_s,
        "memory_bytes": limits.memory_mb * 2**20,
        "nproc": nproc_limit(iso, limits.max_processes),
        "file_bytes": limits.max_file_mb * 2**20,
        "guard": limits.audit_guard,
        "wall_s": limits.timeout_s + WALL_GRACE_S,
    }
    argv = [*wrapper_argv(iso, uid), sys.executable, "-I", "-u", CHILD_PROGRAM, json.dumps(config), code]
    start = time.monotonic()
    proc = subprocess.Popen(
        argv,
        cwd=workdir,
        env=_clean_env(workdir),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        close_fds=True,
    )
    try:
        streams, reason = _collect(proc, start + limits.timeout_s, limits.max_output_bytes)
    finally:
        _kill_tree(proc.pid)
        status, cpu_used = _reap(proc)
        proc.stdout.close()
        proc.stderr.close()
    (out, out_cut), (err, err_cut) = streams
    if reason is None and status == _EXIT_WALL and time.monotonic() >= start + limits.timeout_s:
        reason = "timeout"  # the child's own watchdog (child.py) acted before this late parent
    return SandboxResult(
        stdout=out.decode("utf-8", "replace"),
        stderr=err.decode("utf-8", "replace"),
        exit_code=status,
        timed_out=reason == "timeout",
        killed_reason=_explain(reason, status, cpu_used, limits),
        duration_s=time.monotonic() - start,
        stdout_truncated=out_cut,
        stderr_truncated=err_cut,
    )


def _collect(proc: subprocess.Popen, deadline: float, cap: int) -> tuple[list[tuple[bytes, bool]], str | None]:
    """Read both pipes with a cap until EOF, the deadline, or too much output; never blocks past the deadline."""
    fds = [proc.stdout.fileno(), proc.stderr.fileno()]
    bufs = {fd: bytearray() for fd in fds}
    cut = dict.fromkeys(fds, False)
    reason: str | None = None
    exit_fd = _pidfd(proc.pid)
    with selectors.DefaultSelector() as sel:
        for fd in fds:
            sel.register(fd, selectors.EVENT_READ)
        if exit_fd is not None:
            sel.register(exit_fd, selectors.EVENT_READ)
        while reason is None and any(fd in sel.get_map() for fd in fds):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                reason = "timeout"
                break
            for key, _ in sel.select(remaining):
                if key.fd == exit_fd:  # the child is gone: stop any helpers still holding the pipes
                    sel.unregister(exit_fd)
                    _kill_group(proc.pid)
                    continue
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fd)
                    continue
                room = cap - len(bufs[key.fd])
                bufs[key.fd] += chunk[: max(room, 0)]
                if len(chunk) > room:
                    cut[key.fd] = True
                    reason = "output"
    if exit_fd is not None:
        os.close(exit_fd)
    return [(bytes(bufs[fd]), cut[fd]) for fd in fds], reason


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def _kill_tree(pid: int) -> None:
    """SIGKILL the started process, its children and its process group.

    In the namespace modes the child of ``unshare`` is the PID namespace's init: killing it makes the kernel
    kill everything in the namespace, including code that left the process group with ``os.setsid()``
    (``unshare --kill-child`` cannot do it: ``setpriv`` changing the uid clears the parent-death signal).
    In python mode the started process is the interpreter itself."""
    for process in (*_children_of(pid), pid):
        with suppress(ProcessLookupError, PermissionError):
            os.kill(process, signal.SIGKILL)
    _kill_group(pid)


def _children_of(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as listing:
            return [int(child) for child in listing.read().split()]
    except (OSError, ValueError):
        return []


def _kill_group(pgid: int) -> None:
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _reap(proc: subprocess.Popen) -> tuple[int, float]:
    """Wait for the (killed) child; return its exit code and CPU seconds including reaped helpers."""
    _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    proc.returncode = code
    return code, usage.ru_utime + usage.ru_stime


def _explain(reason: str | None, status: int, cpu_used: float, limits: _Limits) -> str | None:
    if reason == "timeout":
        return f"TimeoutError: the code ran longer than {limits.timeout_s:g} s"
    if reason == "output":
        return f"killed: output limit ({limits.max_output_bytes} bytes per stream)"
    cpu_signals = (-signal.SIGXCPU, -signal.SIGKILL)
    if status == _EXIT_CPU or (status in cpu_signals and cpu_used >= limits.cpu_s):
        return f"TimeoutError: the code used more than {limits.cpu_s} s of CPU time"
    if status < 0:
        try:
            name = signal.Signals(-status).name
        except ValueError:
            name = str(-status)
        return f"killed by signal {name}"
    return None


def _clean_env(workdir: str) -> dict[str, str]:
    """No inherited variables: no tokens, no proxies; one BLAS thread (threads count as processes)."""
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}
    env |= {"LC_ALL": "C.UTF-8", "MPLCONFIGDIR": workdir, "MPLBACKEND": "Agg"}
    env["MALLOC_ARENA_MAX"] = "1"  # a thread's own malloc arena reserves 64 MiB+ of the RLIMIT_AS budget
    env |= dict.fromkeys(("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"), "1")
    return env
