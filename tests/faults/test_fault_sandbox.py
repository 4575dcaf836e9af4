"""Tool sandbox escapes, driven as an agent drives them: ``Action("python", code)`` through the ``math``
environment's Python tool. Each attempt is contained and reported to the agent in the observation, the
episode goes on (the next tool call works), and afterwards the parent process has received no signal,
has no leftover child process, and a sentinel host file and its folder are untouched.

``tests/envs/test_sandbox.py`` covers the sandbox's mechanisms one by one (and each isolation mode); this
file is the agent's-eye view, including the attempts that file lacks (DNS, UDP, Unix sockets, HTTP,
``/proc/<parent>/environ``, low-level ``os.open`` / truncate / utime / chmod / hard links, ``/dev/shm``,
``kill(-1)`` / ``kill(0)``, pty, asyncio subprocesses, ``setsid`` + ignoring SIGTERM, raising rlimits,
thread bombs, stderr floods, binary output, running out of file descriptors, inherited descriptors).
"""

from __future__ import annotations

import hashlib
import os
import signal
import time
from pathlib import Path

import pytest
from live_processes import processes_running

from spear_engine.envs.base import Action, make_env
from spear_engine.envs.sandbox.run import CHILD_PROGRAM

TOOL_TIMEOUT_S = 4.0
"""For the escapes that end at the deadline; the others get GENEROUS_TIMEOUT_S, so that a busy machine's slow
start cannot turn their own error (say MemoryError) into a timeout."""
GENEROUS_TIMEOUT_S = 60.0
ENDS_AT_THE_DEADLINE = frozenset({"infinite_loop", "sleep_forever", "thread_bomb", "setsid_and_sleep", "ignore_sigterm"})
ESCAPE_TARGETS = (Path("/tmp/spear-escape"), Path("/dev/shm/spear-escape"))
CANARY_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP, signal.SIGINT, signal.SIGQUIT)

# name -> (code, fragments of the observation; any one must appear). {S}: the sentinel file, {D}: its folder,
# {M}: a marker file in {D} that a spawned process would create, {PID}: this (the parent) process.
ESCAPES: dict[str, tuple[str, tuple[str, ...]]] = {
    # resources
    "infinite_loop": ("while True:\n    pass", ("TimeoutError",)),
    "sleep_forever": ("import time\ntime.sleep(10**6)", ("TimeoutError",)),
    "memory_bomb": ("chunks = []\nwhile True:\n    chunks.append(bytearray(50 * 2**20))", ("MemoryError",)),
    "one_huge_allocation": ("x = bytearray(64 * 2**30)", ("MemoryError",)),
    "raise_rlimit": ("import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))",
                     ("not allowed to raise maximum limit",)),
    "fork_bomb": ("import os\nwhile True:\n    os.fork()", ("os.fork is not allowed",)),
    "thread_bomb": ("import threading, time\nfor _ in range(100000):\n"
                    "    threading.Thread(target=time.sleep, args=(60,)).start()",
                    ("can't start new thread", "TimeoutError")),
    "huge_output": ("while True:\n    print('x' * 10000)", ("killed: output limit",)),
    "one_huge_line": ("import sys\nsys.stdout.write('y' * (50 * 2**20))", ("killed: output limit",)),
    "stderr_flood": ("import sys\nwhile True:\n    sys.stderr.write('e' * 10000)", ("killed: output limit",)),
    "binary_output": ("import sys\nsys.stdout.buffer.write(bytes(range(256)) * 1000)", ("killed: output limit",)),
    "huge_file": ("open('big', 'wb').write(b'0' * (200 * 2**20))", ("File too large",)),
    "file_descriptors": ("fs = [open('f', 'w') for _ in range(100000)]", ("Too many open files",)),
    "deep_recursion": ("def f():\n    return f()\nf()", ("RecursionError",)),
    "setsid_and_sleep": ("import os, time\nos.setsid()\ntime.sleep(10**6)", ("TimeoutError", "not allowed")),
    "ignore_sigterm": ("import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(10**6)",
                       ("TimeoutError",)),
    # network
    "tcp_connect": ("import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=2)", ("sandbox: socket",)),
    "udp_send": ("import socket\nsocket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('8.8.8.8', 53))",
                 ("sandbox: socket",)),
    "dns_lookup": ("import socket\nsocket.getaddrinfo('example.com', 80)", ("socket.getaddrinfo is not allowed",)),
    "unix_socket": ("import socket\nsocket.socket(socket.AF_UNIX).connect('/var/run/docker.sock')",
                    ("sandbox: socket",)),
    "http_request": ("import http.client\nhttp.client.HTTPConnection('example.com', timeout=2).request('GET', '/')",
                     ("http.client.connect is not allowed",)),
    "urllib": ("import urllib.request\nurllib.request.urlopen('http://example.com', timeout=2)",
               ("urllib.Request is not allowed",)),
    # host files
    "read_sentinel": ("print(open({S!r}).read())", ("sandbox: reading",)),
    "read_passwd": ("print(open('/etc/passwd').read())", ("sandbox: reading",)),
    "read_parent_environ": ("print(open('/proc/{PID}/environ').read())", ("sandbox: reading",)),
    "list_host_folder": ("import os\nprint(os.listdir({D!r}))", ("sandbox: reading",)),
    "chdir_and_list": ("import os\nos.chdir('..')\nprint(os.listdir('.'))", ("sandbox: reading",)),
    "symlink_and_read": ("import os\nos.symlink({S!r}, 'l')\nprint(open('l').read())", ("sandbox: linking",)),
    "write_sentinel": ("open({S!r}, 'w').write('pwned')", ("sandbox: writing",)),
    "low_level_write": ("import os\nfd = os.open({S!r}, os.O_WRONLY | os.O_TRUNC)\nos.write(fd, b'pwned')",
                        ("sandbox: writing",)),
    "truncate": ("import os\nos.truncate({S!r}, 0)", ("sandbox: writing",)),
    "touch_times": ("import os\nos.utime({S!r}, (0, 0))", ("sandbox: writing",)),
    "chmod": ("import os\nos.chmod({S!r}, 0)", ("sandbox: writing",)),
    "delete": ("import os\nos.remove({S!r})", ("sandbox: writing", "PermissionError")),
    "rename": ("import os\nos.rename({S!r}, 'stolen')", ("PermissionError",)),
    "rmtree": ("import shutil\nshutil.rmtree({D!r})", ("PermissionError",)),
    "hard_link": ("import os\nos.link({S!r}, 'h')\nopen('h', 'w').write('pwned')", ("sandbox: writing",)),
    "new_file_beside": ("open({M!r}, 'w').write('pwned')", ("sandbox: writing",)),
    "write_tmp": ("open('/tmp/spear-escape', 'w').write('x')", ("sandbox: writing",)),
    "write_dev_shm": ("open('/dev/shm/spear-escape', 'w').write('x')", ("sandbox: writing",)),
    "patched_builtins": ("import builtins, io\nbuiltins.open = None\nio.open({S!r}, 'w')", ("sandbox: writing",)),
    "inherited_descriptor": ("import os\nfor fd in range(3, 64):\n    try:\n        os.write(fd, b'x')\n"
                             "    except OSError:\n        pass\nprint('tried')", ("tried",)),
    # processes and dangerous modules
    "os_system": ("import os\nos.system('touch {M}')", ("os.system is not allowed",)),
    "subprocess": ("import subprocess\nsubprocess.run(['touch', {M!r}])", ("subprocess.Popen is not allowed",)),
    "exec": ("import os\nos.execv('/usr/bin/touch', ['touch', {M!r}])", ("os.exec is not allowed",)),
    "posix_spawn": ("import os\nos.posix_spawn('/usr/bin/touch', ['touch', {M!r}], {{}})",
                    ("os.posix_spawn is not allowed",)),
    "fork_exec": ("import importlib\nimportlib.import_module('_posixsubprocess').fork_exec()",
                  ("starting processes is not allowed",)),
    "asyncio_subprocess": ("import asyncio\nasyncio.run(asyncio.create_subprocess_exec('touch', {M!r}))",
                           ("not allowed", "Error")),  # the socketpair of its event loop is refused first
    "pty": ("import pty\npty.spawn(['touch', {M!r}])", ("module 'pty' is not available",)),
    "multiprocessing": ("import multiprocessing", ("module 'multiprocessing' is not available",)),
    "ctypes_dlopen": ("import ctypes\nctypes.CDLL('libc.so.6')", ("ctypes.dlopen is not allowed",)),
    "ctypes_symbol": ("import ctypes\nctypes.pythonapi.Py_Initialize", ("ctypes.dlsym is not allowed",)),
    "heap_walk": ("import gc\nprint(len(gc.get_objects()))", ("gc.get_objects is not allowed",)),
    # signals to the parent
    "kill_parent": ("import os\nos.kill(os.getppid(), 9)", ("not allowed", "denied")),
    "kill_parent_by_pid": ("import os\nos.kill({PID}, 15)", ("not allowed", "denied")),
    "kill_every_process": ("import os\nos.kill(-1, 9)", ("not allowed",)),
    "kill_own_group": ("import os\nos.kill(0, 9)", ("not allowed",)),
    "kill_parent_group": ("import os\nos.killpg(os.getpgid({PID}), 15)", ("not allowed", "No such process")),
    "signal_parent_usr1": ("import os, signal\nos.kill({PID}, signal.SIGUSR1)", ("not allowed", "denied")),
}  # fmt: skip


@pytest.fixture(scope="module")
def math_envs():
    """A math environment by tool deadline: short (the escapes that run until it) and generous (the rest)."""
    envs = {t: make_env("math", tool_timeout_s=t, tool_memory_mb=256, max_steps=100_000)
            for t in (TOOL_TIMEOUT_S, GENEROUS_TIMEOUT_S)}  # fmt: skip
    for env in envs.values():
        env.reset(1)
    yield envs
    for env in envs.values():
        env.close()


@pytest.fixture(scope="module")
def canary():
    """Counts every catchable signal the parent receives while the escapes run."""
    received: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: received.append(signum)) for s in CANARY_SIGNALS}
    yield received
    for s, handler in previous.items():
        signal.signal(s, handler)


def _digest(folder: Path) -> dict[str, tuple[str, int, int]]:
    """Every file of the folder with its content hash, mode and modification time."""
    out = {}
    for path in sorted(folder.rglob("*")):
        stat = path.lstat()
        content = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        out[str(path.relative_to(folder))] = (content, stat.st_mode, stat.st_mtime_ns)
    return out


def _children() -> set[int]:
    me = str(os.getpid())
    kids = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == me and fields[0] != "Z":
            kids.add(int(stat.parent.name))
    return kids


@pytest.mark.parametrize("name", list(ESCAPES))
def test_escape_is_contained_reported_and_the_run_goes_on(
    name: str, math_envs, canary, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    math_env = math_envs[TOOL_TIMEOUT_S if name in ENDS_AT_THE_DEADLINE else GENEROUS_TIMEOUT_S]
    host = tmp_path / "host"
    host.mkdir()
    sentinel = host / "sentinel.txt"
    sentinel.write_text("precious")
    before, children_before, sandboxes_before = _digest(host), _children(), processes_running(CHILD_PROGRAM)
    code_template, fragments = ESCAPES[name]
    code = code_template.format(S=str(sentinel), D=str(host), M=str(host / "marker"), PID=os.getpid())

    result = math_env.step(Action("python", code))

    observation = result.observation.text
    assert any(f in observation for f in fragments), (name, observation[-800:])
    assert result.action_valid and not result.done  # a tool call that the agent sees the outcome of
    assert _digest(host) == before, name  # host files untouched, nothing created beside them
    assert not any(p.exists() for p in ESCAPE_TARGETS)
    assert canary == [], f"the parent received signals {canary}"
    deadline = time.monotonic() + 5
    while (_children() - children_before or processes_running(CHILD_PROGRAM) - sandboxes_before) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _children() - children_before, "the sandbox left a process behind"
    assert not processes_running(CHILD_PROGRAM) - sandboxes_before, "a sandboxed process outlived its call (setsid?)"
    # The episode goes on and the tool still works, in the same env, given the generous deadline: on a loaded
    # machine the start of the next sandbox right after a thread bomb has taken more than 4 s (CI, stop 26).
    monkeypatch.setattr(math_env, "tool_timeout_s", GENEROUS_TIMEOUT_S)
    after = math_env.step(Action("python", "print(6 * 7)"))
    assert after.observation.text.strip() == "42" and not after.done
