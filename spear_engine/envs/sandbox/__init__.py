"""Run model-written Python in a locked-down subprocess: the math environment's tool.

Every call gets a fresh interpreter (``python -I -u child.py``) in a fresh private temporary directory
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
  * the wall-clock deadline, enforced by the parent with SIGKILL to the process group and to the PID
    namespace's init (which takes down code that left the group with ``os.setsid()``), and by a
    watchdog thread in the child that ends it a grace period later or as soon as its parent is gone
    (a killed owner; a sleeping process never reaches RLIMIT_CPU).

The isolation mode is probed once per process (:func:`isolation`), strongest first:

``root`` (the parent is root, util-linux ``unshare`` and ``setpriv`` exist), all kernel-enforced:
  a new network namespace (only a loopback that is down: no network at all), a new PID namespace
  (host processes cannot be addressed; when the code exits the kernel kills everything it
  started), a new mount namespace with its own /proc, and a dedicated unprivileged uid per
  concurrent call (so RLIMIT_NPROC, which root ignores, caps processes + threads and a fork bomb
  stops there; host files, the parent and other sandboxes can be neither written nor signalled),
  no capabilities, no_new_privs. If the interpreter or the child program lives in a directory
  others cannot read (e.g. /root/.pyenv) the uid keeps CAP_DAC_READ_SEARCH so that it can start and
  import modules: it can then *read* any file, and only the audit hook below limits reads. Writable by the uid: only
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

Modules, one job each:
  ``run``        starts the child, reads its output with caps, enforces the deadline, explains the end;
                 :func:`run_python`, :func:`isolation`, :func:`available_isolation_modes`
  ``modes``      what isolation this machine offers (probed once) and the commands that enter a mode
  ``workspace``  per-call resources: a dedicated uid (root mode), a private temporary directory
  ``result``     :class:`SandboxResult`, the text an agent sees
  ``child``      the program the sandboxed interpreter runs by path (limits, audit hook, then the code);
                 standard library only, never imported
"""

from spear_engine.envs.sandbox.modes import Isolation
from spear_engine.envs.sandbox.result import SandboxResult
from spear_engine.envs.sandbox.run import (
    CHILD_PROGRAM,
    MAX_CODE_BYTES,
    available_isolation_modes,
    isolation,
    run_python,
)

__all__ = [
    "CHILD_PROGRAM",
    "MAX_CODE_BYTES",
    "Isolation",
    "SandboxResult",
    "available_isolation_modes",
    "isolation",
    "run_python",
]
