"""The sandbox's child program: limits, then the audit guard, then the model-written code.

The parent (:mod:`spear_engine.envs.sandbox.run`) runs this file by path, never imports it::

    [unshare ... setpriv ... --] python -I -u <this file> '<config JSON>' '<code>'

``-I`` keeps the environment, the user's site-packages and this file's directory off ``sys.path``,
so this program imports only the standard library (never spear_engine) and the code sees the same
``sys.path`` as any isolated interpreter. It sets the kernel limits, installs the audit hook (see
the package docstring for what it guards), removes what is not audited, then runs the code as
``<sandbox>`` in a fresh ``__main__`` namespace. Its own frames are left out of tracebacks.
"""

import builtins
import json
import linecache
import os
import pathlib  # noqa: F401  (loaded before the guard, as the prelude always did)
import posix
import resource
import signal
import sys
import time
import traceback

_EXIT_WALL = 124  # the watchdog's exit status (run.py reads it past the deadline as a timeout)
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


def _start_watchdog(wall_s):
    """End this process when its parent is gone or ``wall_s`` has passed (the parent's deadline plus a grace).

    The parent's deadline is a SIGKILL to the process group, but code that calls ``os.setsid()`` leaves the
    group, a process that sleeps never reaches RLIMIT_CPU, and a parent that is killed kills nothing: this
    thread covers all three. It binds what it uses, so code that monkeypatches ``time`` or ``os`` cannot stop it.
    """
    import _thread

    monotonic, sleep, getppid, exit_now = time.monotonic, time.sleep, posix.getppid, posix._exit
    deadline, parent = monotonic() + wall_s, getppid()

    def watch(MemoryError=MemoryError):
        while True:
            try:
                if getppid() != parent or monotonic() >= deadline:
                    break
                sleep(0.1)
            except MemoryError:  # the code has used up the address space: this thread must not die of it
                pass
        exit_now(_EXIT_WALL)  # not SIGKILL to itself: a PID namespace's init ignores that from inside

    default = _thread.stack_size(256 * 1024)  # not the usual 8 MiB of address space, which RLIMIT_AS counts
    try:
        _thread.start_new_thread(watch, ())
    finally:
        _thread.stack_size(default)


def _on_cpu_limit(signum, frame):
    os.write(2, b"\n")
    os._exit(152)


def _make_guard(root, read_roots_raw, str=str, bytes=bytes, int=int, type=type, isinstance=isinstance,
                any=any, bool=bool, OSError=OSError, PermissionError=PermissionError, ImportError=ImportError):
    # Every name the hook uses is bound here (builtins as default arguments, so closure cells), so
    # that code which monkeypatches builtins, os or this module's globals cannot change what it sees.
    # The hook's body is kept exactly as it was written (``%`` formatting, plain loops): hence its noqa marks.
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
        return readlink("/proc/self/fd/%d" % dir_fd)  # noqa: UP031

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
            candidate = "/" + "/".join(parts + [part])  # noqa: RUF005
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
        for r in roots:  # noqa: SIM110
            if path == r or path.startswith(r if r.endswith("/") else r + "/"):
                return True
        return False

    def deny(what, path):
        raise PermissionError("sandbox: %s %r is outside the sandbox directory" % (what, path))  # noqa: UP031

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
                raise ImportError("sandbox: module %r is not available" % name)  # noqa: UP031
            return None
        if event in ctypes_allowed or (event == "ctypes.dlopen" and args[0] is None):
            return None  # the handle of the main program, opened by ``import ctypes``; dlsym stays blocked
        if event in blocked_events or event.startswith(blocked_prefixes):
            raise PermissionError("sandbox: %s is not allowed" % event)  # noqa: UP031
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


def _print_traceback(err, own_file=__file__):
    """The user's traceback without this program's frames (the guard's own frames are noise)."""
    report = traceback.TracebackException(type(err), err, err.__traceback__, compact=True)
    pending, seen = [report], set()
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        current.stack[:] = [frame for frame in current.stack if frame.filename != own_file]
        pending += [current.__cause__, current.__context__]
    sys.stderr.write("".join(report.format()))


def _main():
    cfg = json.loads(sys.argv[1])
    code = sys.argv[2]
    sys.argv[:] = ["<sandbox>"]
    _limit(cfg)
    _start_watchdog(cfg["wall_s"])
    signal.signal(signal.SIGXCPU, _on_cpu_limit)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    os.umask(0o077)
    if cfg["guard"]:
        sys.addaudithook(_make_guard(cfg["root"], _read_roots()))
        _neuter()
    return code


if __name__ == "__main__":
    _code = _main()
    del _main, _make_guard, _limit, _start_watchdog, _neuter, _read_roots, _WRITE_EVENTS, _READ_EVENTS, _CTYPES_ALLOWED
    _run_user_code(_code)
