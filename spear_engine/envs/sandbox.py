"""Run model-written Python in a locked-down subprocess: the math environment's tool.

Every call gets a fresh interpreter (``python -I -u``) in a fresh private temporary directory
that is removed afterwards, a clean environment (no inherited variables, so no secrets or
proxies; HOME and TMPDIR point into the directory), and a wall-clock deadline after which the
whole process group is SIGKILLed. Whatever goes wrong comes back as text in a
:class:`SandboxResult`, never as an exception.

Threat model: the code is written by a policy being trained with RL, so it may be buggy
(infinite loops, memory bombs, huge prints) or, having found that it pays, adversarial. The
layers below say what enforces them.

Kernel-enforced in every mode (limits set before the code runs; an unprivileged process cannot
raise hard limits again):
  * CPU time (RLIMIT_CPU: SIGXCPU is reported as a timeout; the hard limit one second later kills),
  * address space (RLIMIT_AS: allocations fail and Python raises MemoryError),
  * file size (RLIMIT_FSIZE: larger writes fail with EFBIG), no core files, at most 256 open files,
  * output: the parent reads at most ``max_output_bytes`` per stream and kills the child beyond it,
  * the wall-clock deadline, enforced by the parent with SIGKILL to the process group.

The isolation mode is probed once per process (:func:`isolation`), strongest first:

``root`` (the parent is root, util-linux ``unshare`` and ``setpriv`` exist), all kernel-enforced:
  a new network namespace (only a loopback that is down: no network at all), a new PID namespace
  (host processes cannot be addressed; when the code exits the kernel kills everything it
  started), a new mount namespace with its own /proc, and a dedicated unprivileged uid per
  concurrent call (so RLIMIT_NPROC, which root ignores, caps processes + threads and a fork bomb
  stops there; host files, the parent and other sandboxes can be neither written nor signalled),
  no capabilities, no_new_privs. If the interpreter lives in a directory others cannot read
  (e.g. /root/.pyenv) the uid keeps CAP_DAC_READ_SEARCH so that it can import modules: it can then
  *read* any file, and only the audit hook below limits reads. Writable by the uid: only
  world-writable places (/tmp, /dev/shm), which the audit hook guards.
``userns`` (the parent is not root and unprivileged user namespaces work): the same namespaces,
  entered as the mapped root of a new user namespace with every capability dropped. RLIMIT_NPROC
  holds (counted per user namespace). The code keeps the parent's uid on the host, so files the
  parent can write are writable at kernel level: the audit hook keeps writes in the directory.
  (A root parent picks ``root`` mode; ``userns`` under a root parent keeps uid 0 and is weaker.)
``python``: no namespaces. Network, processes, signals and files are guarded by the audit hook
  only; RLIMIT_NPROC is the user's current task count + ``max_processes`` (and root ignores it).

Best-effort in every mode, by a ``sys.addaudithook`` hook installed before the code runs (it
cannot be removed, and it binds everything it uses so monkeypatching builtins does not weaken it,
but an in-process guard can be bypassed by code that corrupts memory — ``ctypes.memmove`` or
pointer casts through a ``ctypes.Union`` are enough for an attacker who knows CPython's layout —
or that races it, e.g. swapping a symlink between the check and the open):
  * writes (open for writing, remove, rename, link, mkdir, chmod, utime, rmtree, sqlite, ...) only
    inside the temporary directory, after resolving symlinks with captured ``posix`` functions,
  * reads and directory listings only inside the temporary directory and the interpreter's own
    directories; no directory handles outside the temporary directory (against ``dir_fd`` tricks),
  * no process creation (fork, exec, spawn, system, Popen, ``_posixsubprocess.fork_exec``,
    multiprocessing), no signals to other processes,
  * no sockets at all, no loading of native libraries or symbols through ctypes (ctypes itself
    imports: sympy needs its types; so does subprocess, whose Popen is refused), no cffi, no
    subinterpreters, no CPython test modules, no ``gc.get_objects``-style heap walking;
    ``os.mkfifo``, ``os.mknod``, ``os.pidfd_open`` and ``signal.pidfd_send_signal`` (not audited)
    are deleted.
Not covered: disk use inside the temporary directory beyond RLIMIT_FSIZE per file (many files can
fill a disk until the deadline), CPU of several cores if the hook is bypassed (one process
otherwise), side channels, and kernel exploits.
"""

from __future__ import annotations

import json
import os
import pwd
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass

MAX_CODE_BYTES = 100_000
"""Longer code is refused (it travels on the command line; Linux caps one argument at 128 KiB)."""

_EXIT_CPU = 152  # 128 + SIGXCPU: the child's own SIGXCPU handler exits with this code
_UID_BASE = 2_100_000_000
_UID_POOL = 128
_ISOLATION_MODES = ("root", "userns", "python")


@dataclass(frozen=True)
class SandboxResult:
    """What one run produced; ``killed_reason`` says why it was stopped, in words for the agent."""

    stdout: str
    stderr: str
    exit_code: int | None
    timed_out: bool = False
    killed_reason: str | None = None
    duration_s: float = 0.0
    stdout_truncated: bool = False
    stderr_truncated: bool = False

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and self.killed_reason is None

    def as_observation(self, max_chars: int = 4000, traceback_lines: int = 12) -> str:
        """The text an agent sees: stdout, then the last lines of stderr, then why it was stopped."""
        parts: list[str] = []
        out = self.stdout.rstrip("\n")
        if out:
            clipped = out[:max_chars]
            cut = self.stdout_truncated or len(out) > max_chars
            parts.append(clipped + ("\n... [output truncated]" if cut else ""))
        err = self.stderr.rstrip("\n")
        if err:
            lines = err.splitlines()
            tail = lines[-traceback_lines:]
            prefix = ["..."] if len(lines) > len(tail) or self.stderr_truncated else []
            parts.append(_clip_tail("\n".join(prefix + tail), max_chars))
        if self.killed_reason:
            parts.append(self.killed_reason)
        return "\n".join(parts) if parts else "(no output)"


def _clip_tail(text: str, limit: int) -> str:
    return text if len(text) <= limit else "... " + text[-limit:]


@dataclass(frozen=True)
class Isolation:
    """How the sandbox isolates code on this machine (see the module docstring)."""

    mode: str
    unshare: str | None = None
    setpriv: str | None = None
    read_cap: bool = False
    """root mode only: the sandbox uid keeps CAP_DAC_READ_SEARCH to reach the interpreter."""


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
        with _uid_lease(iso) as uid, _private_dir(uid) as workdir:
            return _run(code, iso, limits, uid, workdir)
    except OSError as err:  # could not create the directory or start the process
        return SandboxResult("", "", None, killed_reason=f"sandbox error: {err}")


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
        "nproc": _nproc_limit(iso, limits.max_processes),
        "file_bytes": limits.max_file_mb * 2**20,
        "guard": limits.audit_guard,
    }
    argv = [*_wrapper_argv(iso, uid), sys.executable, "-I", "-u", "-c", _PRELUDE, json.dumps(config), code]
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
        _kill_group(proc.pid)
        status, cpu_used = _reap(proc)
        proc.stdout.close()
        proc.stderr.close()
    (out, out_cut), (err, err_cut) = streams
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
    env |= dict.fromkeys(("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"), "1")
    return env


# ----------------------------------------------------------------------------- isolation probing

_probe_lock = threading.Lock()
_probed: dict[str, Isolation] = {}


def isolation() -> Isolation:
    """The strongest isolation that works on this machine (probed once, by running a trivial program)."""
    return _select_isolation(None)


def available_isolation_modes() -> list[str]:
    """Every mode that works here, strongest first (``python`` always works)."""
    _probe_all()
    return [mode for mode in _ISOLATION_MODES if mode in _probed]


def _select_isolation(mode: str | None) -> Isolation:
    if mode is not None and mode not in _ISOLATION_MODES:
        raise ValueError(f"unknown sandbox isolation mode '{mode}'; expected one of {', '.join(_ISOLATION_MODES)}")
    _probe_all()
    if mode is None:  # if even the plain interpreter failed its probe, runs will report why as text
        return next((_probed[m] for m in _ISOLATION_MODES if m in _probed), Isolation("python"))
    if mode not in _probed:
        raise ValueError(f"sandbox isolation mode '{mode}' does not work on this machine")
    return _probed[mode]


def _probe_all() -> None:
    with _probe_lock:
        if _probed:
            return
        unshare, setpriv = shutil.which("unshare"), shutil.which("setpriv")
        candidates = [Isolation("python")]
        if unshare:
            candidates.append(Isolation("userns", unshare=unshare, setpriv=setpriv))
        if unshare and setpriv and os.geteuid() == 0:
            candidates.append(Isolation("root", unshare, setpriv, read_cap=not _others_can_read_python()))
        for iso in candidates:
            if _works(iso):
                _probed[iso.mode] = iso


def _works(iso: Isolation) -> bool:
    limits = _Limits(20.0, 10, 1024, 4096, 16, 1)
    try:
        with _uid_lease(iso) as uid, _private_dir(uid) as workdir:
            result = _run("import json\nprint('sandbox-ok')", iso, limits, uid, workdir)
    except OSError:
        return False
    return result.ok and result.stdout.strip() == "sandbox-ok"


def _others_can_read_python() -> bool:
    """Whether an unrelated uid can traverse to and read the interpreter's directories."""
    import sysconfig

    dirs = {sys.prefix, sys.base_prefix, sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"]}
    dirs.add(os.path.dirname(os.path.realpath(sys.executable)))
    for directory in dirs:
        path = os.path.realpath(directory)
        while True:
            try:
                mode = os.stat(path).st_mode
            except OSError:
                return False
            if not mode & 0o001 or (path in dirs and not mode & 0o004):
                return False
            if path == "/":
                break
            path = os.path.dirname(path)
    return True


def _wrapper_argv(iso: Isolation, uid: int | None) -> list[str]:
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


def _nproc_limit(iso: Isolation, max_processes: int) -> int:
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


# ----------------------------------------------------------------------------- per-call resources


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
def _uid_lease(iso: Isolation) -> Iterator[int | None]:
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
def _private_dir(uid: int | None) -> Iterator[str]:
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


# ----------------------------------------------------------------------------- the child's prelude

_PRELUDE = r'''
import builtins, json, linecache, os, pathlib, posix, resource, signal, sys, traceback

_BLOCKED_MODULES = frozenset({
    "cffi", "_cffi_backend", "multiprocessing",
    "_multiprocessing", "_posixshmem", "pty", "_xxsubinterpreters", "_xxinterpchannels", "_testcapi",
    "_testinternalcapi", "_testbuffer", "_testmultiphase", "_testimportmultiple", "_testclinic",
    "_ctypes_test", "_xxtestfuzz", "syslog", "readline", "_dbm", "_gdbm", "_lsprof",
})
_BLOCKED_EVENTS = frozenset({
    "os.system", "os.fork", "os.forkpty", "os.posix_spawn", "os.exec", "os.spawn", "os.startfile",
    "os.killpg", "subprocess.Popen", "pty.spawn", "gc.get_objects", "gc.get_referrers", "gc.get_referents",
    "sqlite3.enable_load_extension", "sqlite3.load_extension", "urllib.Request", "webbrowser.open",
    "os.add_dll_directory", "sys.remote_exec",
})
# ctypes may be imported (sympy needs its types) but loads no library, finds no symbol, calls nothing
_CTYPES_ALLOWED = frozenset({"ctypes.create_string_buffer", "ctypes.create_unicode_buffer", "ctypes.get_errno",
                             "ctypes.set_errno", "ctypes.get_last_error", "ctypes.set_last_error"})
_BLOCKED_PREFIXES = ("socket.", "ctypes.", "ftplib.", "http.client.", "smtplib.", "poplib.", "imaplib.",
                     "nntplib.", "telnetlib.", "os.exec", "os.spawn", "os.posix_spawn", "_winapi.", "winreg.")
# audit event -> ((path argument, dir_fd argument or None), ...) for operations that modify files
_WRITE_EVENTS = {
    "os.remove": ((0, 1),), "os.rmdir": ((0, 1),), "os.mkdir": ((0, 2),), "os.rename": ((0, 2), (1, 3)),
    "os.link": ((0, 2), (1, 3)), "os.symlink": ((1, 2),), "os.chmod": ((0, 2),), "os.chown": ((0, 3),),
    "os.utime": ((0, 3),), "os.truncate": ((0, None),), "os.chflags": ((0, None),),
    "os.setxattr": ((0, None),), "os.removexattr": ((0, None),), "shutil.rmtree": ((0, 1),),
    "sqlite3.connect": ((0, None),), "tempfile.mkstemp": ((0, None),), "tempfile.mkdtemp": ((0, None),),
}
_READ_EVENTS = {"os.listdir": 0, "os.scandir": 0, "os.listxattr": 0, "os.getxattr": 0}


def _limit(cfg):
    R = resource
    cpu = cfg["cpu_s"]
    wanted = ((R.RLIMIT_CPU, cpu, cpu + 1), (R.RLIMIT_AS, cfg["memory_bytes"], cfg["memory_bytes"]),
              (R.RLIMIT_NPROC, cfg["nproc"], cfg["nproc"]), (R.RLIMIT_CORE, 0, 0),
              (R.RLIMIT_FSIZE, cfg["file_bytes"], cfg["file_bytes"]), (R.RLIMIT_NOFILE, 256, 256))
    for res, soft, hard in wanted:
        cur_hard = R.getrlimit(res)[1]
        if cur_hard != R.RLIM_INFINITY:
            hard = min(hard, cur_hard)
        R.setrlimit(res, (min(soft, hard), hard))


def _on_cpu_limit(signum, frame):
    os.write(2, b"\n")
    os._exit(152)


def _make_guard(root, read_roots_raw, str=str, bytes=bytes, int=int, type=type, isinstance=isinstance,
                any=any, bool=bool, OSError=OSError, PermissionError=PermissionError, ImportError=ImportError):
    # Every name the hook uses is bound here (builtins as default arguments, so closure cells), so
    # that code which monkeypatches builtins, os or this module's globals cannot change what it sees.
    lstat, stat, readlink, getcwd, getpid, fspath = posix.lstat, posix.stat, posix.readlink, posix.getcwd, posix.getpid, posix.fspath
    str_copy, bytes_decode = str.__str__, bytes.decode
    blocked_modules, blocked_events, blocked_prefixes = _BLOCKED_MODULES, _BLOCKED_EVENTS, _BLOCKED_PREFIXES
    ctypes_allowed = _CTYPES_ALLOWED
    write_events, read_events = dict(_WRITE_EVENTS), dict(_READ_EVENTS)
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
    ifmt, iflnk, ifdir = 0o170000, 0o120000, 0o040000

    def text_of(path):
        if type(path) is not str and type(path) is not bytes:
            path = fspath(path)
        if isinstance(path, bytes):
            return bytes_decode(path, "utf-8", "surrogateescape")
        return str_copy(path)

    def base_dir(dir_fd):
        if dir_fd is None or dir_fd < 0:
            return getcwd()
        return readlink("/proc/self/fd/%d" % dir_fd)

    def resolve(text, dir_fd=None):
        if not text.startswith("/"):
            text = base_dir(dir_fd) + "/" + text
        pending = text.split("/")[::-1]
        parts, hops = [], 0
        while pending:
            part = pending.pop()
            if part in ("", "."):
                continue
            if part == "..":
                if parts:
                    parts.pop()
                continue
            candidate = "/" + "/".join(parts + [part])
            try:
                mode = lstat(candidate).st_mode
            except OSError:
                parts.append(part)
                continue
            if mode & ifmt == iflnk:
                hops += 1
                if hops > 40:
                    raise PermissionError("sandbox: too many symbolic links")
                target = readlink(candidate)
                if target.startswith("/"):
                    parts = []
                pending.extend(target.split("/")[::-1])
                continue
            parts.append(part)
        return "/" + "/".join(parts)

    root = resolve(root)
    read_roots = tuple({resolve(r) for r in read_roots_raw} | {root})

    def under(path, roots):
        for r in roots:
            if path == r or path.startswith(r if r.endswith("/") else r + "/"):
                return True
        return False

    def deny(what, path):
        raise PermissionError("sandbox: %s %r is outside the sandbox directory" % (what, path))

    def check_write(path, dir_fd=None):
        if type(path) is int or path is None:
            return
        text = text_of(path)
        if text == ":memory:" or text == "":
            return
        if not under(resolve(text, dir_fd), (root,)):
            deny("writing", text)

    def check_read(path, opening=False):
        if type(path) is int or path is None:
            return
        text = text_of(path)
        real = resolve(text)
        if not under(real, read_roots):
            deny("reading", text)
        if opening and not under(real, (root,)):
            try:
                is_dir = stat(real).st_mode & ifmt == ifdir
            except OSError:
                is_dir = False
            if is_dir:
                deny("opening the directory", text)

    def check_open(args):
        path, mode, flags = args[0], args[1], args[2]
        writing = bool((flags or 0) & write_flags) or (type(mode) is str and any(c in mode for c in "wax+"))
        if writing:
            check_write(path)
        else:
            check_read(path, opening=True)

    def check_symlink(args):
        target, link = text_of(args[0]), text_of(args[1])
        link_real = resolve(link, args[2])
        target_abs = target if target.startswith("/") else link_real.rsplit("/", 1)[0] + "/" + target
        if not under(resolve(target_abs), (root,)):
            deny("linking to", target)

    def hook(event, args):
        if event == "open":
            return check_open(args)
        if event == "import":
            name = args[0] if type(args[0]) is str else ""
            if name in blocked_modules or name.partition(".")[0] in blocked_modules:
                raise ImportError("sandbox: module %r is not available" % name)
            return None
        if event in ctypes_allowed or (event == "ctypes.dlopen" and args[0] is None):
            return None  # the handle of the main program, opened by ``import ctypes``; dlsym stays blocked
        if event in blocked_events or event.startswith(blocked_prefixes):
            raise PermissionError("sandbox: %s is not allowed" % event)
        if event == "os.kill":
            if args[0] != getpid():
                raise PermissionError("sandbox: signals to other processes are not allowed")
            return None
        spots = write_events.get(event)
        if spots is not None:
            if event == "os.symlink":
                check_symlink(args)
            for path_at, fd_at in spots:
                check_write(args[path_at], None if fd_at is None else args[fd_at])
            return None
        at = read_events.get(event)
        if at is not None:
            check_read(args[at])
        return None

    return hook


def _read_roots():
    roots = [p for p in sys.path if p]
    roots += [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix]
    roots += ["/dev/null", "/dev/urandom", "/dev/zero", "/usr/share/zoneinfo", "/etc/localtime"]
    return roots


def _neuter():
    """Remove what is not audited but could reach outside: raw fork_exec, process handles, fifos, device nodes."""
    import _posixsubprocess  # subprocess stays importable (sympy imports it); Popen itself is audited

    def refuse(*args, **kwargs):
        raise PermissionError("sandbox: starting processes is not allowed")

    _posixsubprocess.fork_exec = refuse
    for module in (os, posix):
        for name in ("mkfifo", "mknod", "pidfd_open"):
            if hasattr(module, name):
                delattr(module, name)
    if hasattr(signal, "pidfd_send_signal"):
        del signal.pidfd_send_signal
    for name in list(sys.modules):
        if name in _BLOCKED_MODULES or name.partition(".")[0] in _BLOCKED_MODULES:
            del sys.modules[name]


def _run_user_code(code):
    linecache.cache["<sandbox>"] = (len(code), None, code.splitlines(True), "<sandbox>")
    try:
        compiled = compile(code, "<sandbox>", "exec", dont_inherit=True)
    except (SyntaxError, ValueError, OverflowError, MemoryError, RecursionError) as err:
        traceback.print_exception(type(err), err, None)
        sys.exit(1)
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    try:
        exec(compiled, namespace)
    except SystemExit:
        raise
    except BaseException as err:
        _print_traceback(err)
        sys.exit(1)


def _print_traceback(err):
    """The user's traceback without the prelude's frames (the guard's own frames are noise)."""
    report = traceback.TracebackException(type(err), err, err.__traceback__, compact=True)
    pending, seen = [report], set()
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        current.stack[:] = [frame for frame in current.stack if frame.filename != "<string>"]
        pending += [current.__cause__, current.__context__]
    sys.stderr.write("".join(report.format()))


def _main():
    cfg = json.loads(sys.argv[1])
    code = sys.argv[2]
    sys.argv[:] = ["<sandbox>"]
    _limit(cfg)
    signal.signal(signal.SIGXCPU, _on_cpu_limit)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    os.umask(0o077)
    if cfg["guard"]:
        sys.addaudithook(_make_guard(cfg["root"], _read_roots()))
        _neuter()
    return code


_code = _main()
del _main, _make_guard, _limit, _neuter, _read_roots, _WRITE_EVENTS, _READ_EVENTS, _CTYPES_ALLOWED
_run_user_code(_code)
'''
