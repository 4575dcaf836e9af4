"""The Python tool's sandbox: results come back as text, escapes are contained, the host stays untouched."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from live_processes import processes_running

from spear_engine.envs import sandbox
from spear_engine.envs.sandbox import SandboxResult, run_python
from spear_engine.envs.sandbox import run as run_module

MODES = sandbox.available_isolation_modes()
BEST = MODES[0]
# Where the kernel itself enforces RLIMIT_NPROC: root mode (a dedicated uid) and userns mode when the
# tests do not run as root (root's processes are exempt from RLIMIT_NPROC, even in a user namespace).
NPROC_MODES = [m for m in MODES if m == "root" or (m == "userns" and os.geteuid() != 0)]
# Where host files are protected by file permissions: only root mode runs the code as another uid.
OTHER_UID_MODES = [m for m in MODES if m == "root"]
NAMESPACE_MODES = [m for m in MODES if m in ("root", "userns")]


def run(code: str, **kwargs) -> SandboxResult:
    """A generous deadline unless a test is about deadlines: a loaded 2-core machine starts Python slowly."""
    kwargs.setdefault("timeout_s", 30.0)
    return run_python(code, **kwargs)


# ----------------------------------------------------------------------------- basics


def test_stdout_exit_code_and_duration():
    result = run("print('hello', 6 * 7)")
    assert result.ok
    assert result.stdout == "hello 42\n"
    assert result.exit_code == 0 and not result.timed_out and result.killed_reason is None
    assert 0 < result.duration_s < 30
    assert result.as_observation() == "hello 42"


def test_exception_comes_back_as_the_traceback_tail():
    result = run("x = 1\nprint('before')\nx / 0")
    assert result.exit_code == 1 and not result.ok
    obs = result.as_observation()
    assert obs.startswith("before")
    assert obs.rstrip().endswith("ZeroDivisionError: division by zero")
    assert 'File "<sandbox>", line 3' in obs
    assert "<string>" not in result.stderr and sandbox.CHILD_PROGRAM not in result.stderr  # the child's frames are hidden


def test_the_child_is_a_file_run_by_path_in_isolated_mode():
    assert os.path.isfile(sandbox.CHILD_PROGRAM)
    result = run("import sys\nprint(sys.orig_argv[1:4])\nprint(sys.flags.isolated, sys.argv)")
    assert result.stdout.splitlines() == [str(["-I", "-u", sandbox.CHILD_PROGRAM]), "1 ['<sandbox>']"]


def test_syntax_error_and_empty_output_are_text():
    assert "SyntaxError" in run("def f(:").as_observation()
    assert run("x = 1").as_observation() == "(no output)"


def test_refusals_never_raise():
    assert "NUL" in run("print(1)\x00").killed_reason
    assert "longer than" in run("#" * (sandbox.MAX_CODE_BYTES + 1)).killed_reason


def test_common_math_libraries_import():
    result = run("import math, fractions, statistics, numpy, sympy\nprint(sympy.factor('x**2 - 1'), numpy.arange(4).sum())",
                 timeout_s=20.0, cpu_s=20)
    assert result.stdout.strip() == "(x - 1)*(x + 1) 6", result.as_observation()


def test_writes_inside_its_own_directory_which_is_removed_afterwards():
    result = run("import os\nopen('notes.txt', 'w').write('kept')\nprint(open('notes.txt').read())\nprint(os.getcwd())")
    assert result.ok, result.as_observation()
    text, cwd = result.stdout.split()
    assert text == "kept"
    assert not os.path.exists(cwd)


def test_environment_is_clean(monkeypatch):
    monkeypatch.setenv("SPEAR_TEST_SECRET", "hunter2")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    result = run("import os\nprint(sorted(os.environ))")
    assert "SPEAR_TEST_SECRET" not in result.stdout and "HTTPS_PROXY" not in result.stdout
    assert "hunter2" not in result.stdout


def test_concurrent_calls_from_threads_stay_separate():
    results: dict[int, SandboxResult] = {}

    def worker(i: int) -> None:
        results[i] = run(f"import os\nopen('mine', 'w').write('{i}')\nprint(open('mine').read(), os.getcwd())")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(int(r.stdout.split()[0]) for r in results.values()) == list(range(6))
    assert len({r.stdout.split()[1] for r in results.values()}) == 6


# ----------------------------------------------------------------------------- resource escapes


def test_infinite_loop_hits_the_wall_clock_timeout():
    start = time.monotonic()
    result = run("while True:\n    pass", timeout_s=1.0)
    assert result.timed_out
    assert result.killed_reason == "TimeoutError: the code ran longer than 1 s"
    assert time.monotonic() - start < 10
    assert result.as_observation().endswith("TimeoutError: the code ran longer than 1 s")


def test_sleeping_code_is_killed_at_the_deadline():
    # 5 s, not 1: a busy machine can take a second to start the interpreter, and 'started' must come first
    result = run("import time\nprint('started')\ntime.sleep(60)", timeout_s=5.0)
    assert result.timed_out and result.stdout == "started\n"  # output before the kill is kept


def _left_after(marker: str, within_s: float) -> set[int]:
    """The marked processes still alive ``within_s`` from now (returns as soon as there are none)."""
    deadline = time.monotonic() + within_s
    while (alive := processes_running(marker)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive


# python mode is left out: there the interpreter itself leads the session, so os.setsid() fails (EPERM)
@pytest.mark.parametrize("mode", NAMESPACE_MODES)
def test_code_that_leaves_the_process_group_is_killed_with_it(mode, monkeypatch):
    monkeypatch.setattr(run_module, "WALL_GRACE_S", 3600.0)  # the parent alone must do it, not the child's watchdog
    marker = f"spear-setsid-{uuid.uuid4().hex}"
    result = run(f"# {marker}\nimport os, time\nos.setsid()\nprint('left', flush=True)\ntime.sleep(3600)",
                 isolation_mode=mode, timeout_s=5.0)  # fmt: skip
    assert result.timed_out and result.stdout == "left\n", result.as_observation()
    assert _left_after(marker, 30.0) == set(), "a sandboxed process outlived its call"


@pytest.mark.parametrize("mode", MODES)
def test_a_sandbox_whose_owner_is_killed_ends_itself_after_the_deadline(mode):
    marker = f"spear-orphan-{uuid.uuid4().hex}"
    owner_program = ("import sys\nfrom spear_engine.envs.sandbox import run_python\n"
                     "run_python(sys.stdin.read(), timeout_s=2.0, isolation_mode=sys.argv[1])")  # fmt: skip
    owner = subprocess.Popen([sys.executable, "-c", owner_program, mode], stdin=subprocess.PIPE, text=True)
    owner.stdin.write(f"# {marker}\nimport time\ntime.sleep(3600)")  # by stdin: only the sandbox carries the marker
    owner.stdin.close()
    try:
        started = time.monotonic() + 120.0
        while not processes_running(marker) and time.monotonic() < started and owner.poll() is None:
            time.sleep(0.05)
        assert processes_running(marker), "the sandbox never started"
    finally:
        owner.kill()  # before its deadline: its own clean-up never runs
        owner.wait()
    assert _left_after(marker, 60.0) == set(), "a sandboxed process outlived its killed owner"


def test_cpu_time_limit():
    result = run("while True:\n    pass", timeout_s=60.0, cpu_s=1)
    assert not result.timed_out
    assert "CPU time" in result.killed_reason


def test_memory_bomb_raises_memory_error_inside():
    result = run("chunks = []\nwhile True:\n    chunks.append(bytearray(50 * 2**20))", memory_mb=256)
    assert result.as_observation().rstrip().endswith("MemoryError")


def test_huge_output_is_cut_and_the_child_killed():
    result = run("while True:\n    print('x' * 1000)", max_output_bytes=4096)
    assert result.killed_reason.startswith("killed: output limit")
    assert result.stdout_truncated
    assert len(result.stdout) <= 4096
    assert "[output truncated]" in result.as_observation()


def test_large_file_is_capped_by_rlimit_fsize():
    result = run("open('big', 'wb').write(b'0' * (8 * 2**20))", max_file_mb=1)
    assert "File too large" in result.stderr


def test_fork_bomb_is_contained():
    result = run("import os\nwhile True:\n    os.fork()")
    assert "not allowed" in result.as_observation()


@pytest.mark.parametrize("mode", NPROC_MODES)
def test_fork_bomb_stops_at_rlimit_nproc_without_the_audit_hook(mode):
    code = (
        "import os, time\nn = 0\ntry:\n    while True:\n        if os.fork() == 0:\n"
        "            time.sleep(30)\n            os._exit(0)\n        n += 1\n"
        "except OSError as err:\n    print('stopped after', n, err.errno)"
    )
    result = run(code, isolation_mode=mode, max_processes=8, audit_guard=False)
    assert result.stdout.startswith("stopped after"), result.as_observation()
    assert int(result.stdout.split()[2]) < 8
    assert result.duration_s < 25  # the children sleep 30 s: they died with the PID namespace


@pytest.mark.parametrize("mode", NPROC_MODES)
def test_threads_count_against_the_process_limit(mode):
    code = (
        "import threading, time\nn = 0\ntry:\n    for _ in range(50):\n"
        "        threading.Thread(target=time.sleep, args=(0.5,), daemon=True).start()\n        n += 1\n"
        "except RuntimeError:\n    pass\nprint(n)"
    )
    result = run(code, isolation_mode=mode, max_processes=8, memory_mb=2048)
    assert int(result.stdout) < 8


# ----------------------------------------------------------------------------- host escapes


@pytest.mark.parametrize("mode", MODES)
def test_network_is_blocked(mode):
    code = "import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=2)"
    result = run(code, isolation_mode=mode)
    assert not result.ok and "PermissionError: sandbox: socket" in result.as_observation()


@pytest.mark.parametrize("mode", NAMESPACE_MODES)
def test_network_namespace_has_no_route_even_without_the_audit_hook(mode):
    code = (
        "import socket\ntry:\n    socket.create_connection(('1.1.1.1', 80), timeout=2)\n"
        "except OSError as err:\n    print('blocked', err.errno)\nelse:\n    print('connected')"
    )
    result = run(code, isolation_mode=mode, audit_guard=False)
    assert result.stdout.startswith("blocked"), result.as_observation()


@pytest.mark.parametrize("mode", MODES)
def test_writing_deleting_and_renaming_host_files_fail(mode, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    outside = tmp_path / "new.txt"
    attempts = [
        f"open({str(outside)!r}, 'w').write('pwned')",
        f"import os\nos.remove({str(victim)!r})",
        f"import os\nos.rename({str(victim)!r}, 'stolen.txt')",
        f"import shutil\nshutil.rmtree({str(tmp_path)!r})",
        f"import pathlib\npathlib.Path({str(victim)!r}).write_text('pwned')",
        f"import os\nos.symlink({str(victim)!r}, 'link')\nopen('link', 'w').write('pwned')",
        f"import os\nos.chdir({str(tmp_path)!r})\nopen('new.txt', 'w').write('pwned')",
    ]
    for code in attempts:
        result = run(code, isolation_mode=mode)
        assert not result.ok, code
        assert "PermissionError" in result.as_observation(), (code, result.as_observation())
    assert victim.read_text() == "precious"
    assert not outside.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["victim.txt"]


@pytest.mark.parametrize("mode", OTHER_UID_MODES)
def test_host_files_are_protected_by_the_kernel_without_the_audit_hook(mode, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    code = f"try:\n    open({str(victim)!r}, 'w').write('pwned')\nexcept OSError as err:\n    print('denied', err.errno)"
    result = run(code, isolation_mode=mode, audit_guard=False)
    assert result.stdout.startswith("denied"), result.as_observation()
    assert victim.read_text() == "precious"


@pytest.mark.parametrize("mode", MODES)
def test_reading_host_files_fails(mode, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cr3t")
    for code in (f"print(open({str(secret)!r}).read())", f"import os\nprint(os.listdir({str(tmp_path)!r}))"):
        result = run(code, isolation_mode=mode)
        assert "s3cr3t" not in result.stdout and "secret.txt" not in result.stdout
        assert "PermissionError: sandbox: reading" in result.as_observation()


@pytest.mark.parametrize("mode", MODES)
def test_process_and_library_escapes_fail(mode, tmp_path):
    marker = tmp_path / "ran"
    attempts = {
        f"import os\nos.system('touch {marker}')": "os.system is not allowed",
        f"import subprocess\nsubprocess.run(['touch', {str(marker)!r}])": "subprocess.Popen is not allowed",
        f"import os\nos.execv('/usr/bin/touch', ['touch', {str(marker)!r}])": "os.exec is not allowed",
        f"import os\nos.posix_spawn('/usr/bin/touch', ['touch', {str(marker)!r}], {{}})": "os.posix_spawn is not allowed",
        "import ctypes\nctypes.CDLL('libc.so.6')": "ctypes.dlopen is not allowed",
        "import ctypes\nctypes.pythonapi.Py_Initialize": "ctypes.dlsym is not allowed",
        "import multiprocessing": "module 'multiprocessing' is not available",
        "import _posixsubprocess\n_posixsubprocess.fork_exec()": "starting processes is not allowed",
    }
    for code, message in attempts.items():
        result = run(code, isolation_mode=mode)
        assert message in result.as_observation(), (code, result.as_observation())
    assert not marker.exists()


@pytest.mark.parametrize("mode", MODES)
def test_signals_to_the_parent_fail(mode):
    for code in ("import os\nos.kill(os.getppid(), 9)", "import os, signal\nos.killpg(os.getpgid(os.getppid()), 9)"):
        result = run(code, isolation_mode=mode)
        assert "not allowed" in result.as_observation(), result.as_observation()
    assert run("print('parent alive')", isolation_mode=mode).stdout == "parent alive\n"


@pytest.mark.parametrize("mode", NAMESPACE_MODES)
def test_parent_is_out_of_reach_without_the_audit_hook(mode):
    code = f"import os\ntry:\n    os.kill({os.getpid()}, 9)\nexcept OSError as err:\n    print('denied', err.errno)"
    result = run(code, isolation_mode=mode, audit_guard=False)
    assert result.stdout.startswith("denied")  # the host pid is not in the sandbox's PID namespace


def test_monkeypatching_builtins_does_not_weaken_the_guard(tmp_path):
    target = tmp_path / "x.txt"
    code = f"import builtins\nbuiltins.type = lambda obj: int\nbuiltins.isinstance = lambda *a: False\nopen({str(target)!r}, 'w')"
    assert "sandbox: writing" in run(code).as_observation()
    assert not target.exists()


def test_no_leftover_directories():
    before = {p for p in os.listdir(Path(os.environ.get("TMPDIR", "/tmp"))) if p.startswith("spear-sandbox-")}
    run("import os\nos.mkdir('d')\nopen('d/f', 'w').write('x')\nos.chmod('d', 0)")
    after = {p for p in os.listdir(Path(os.environ.get("TMPDIR", "/tmp"))) if p.startswith("spear-sandbox-")}
    assert after <= before
