"""Guards around environment calls: deadlines, result checks, quiet closing (README: Faults).

An environment is third-party code (a text game, a Java process, a web simulator, a Python sandbox):
it may raise, hang, or answer with something that is not a :class:`StepResult`. The agent loop runs
every ``reset`` / ``step`` through :func:`run_with_deadline` and checks what comes back with
:func:`step_result_problem` / :func:`observation_problem`; a call that fails any of these ends its
episode as failed and the env is replaced (see :class:`~spear_engine.rollout.agent_loop.AgentLoop`).

Calls run on daemon threads, one per call, at most ``workers`` at a time. A call that overruns its
deadline is abandoned: Python cannot stop a thread, so it keeps running (or hanging) on its own, but
nothing waits for it, its late result is dropped, and being a daemon it never blocks interpreter
exit (a ``ThreadPoolExecutor`` worker would: its threads are joined at exit).
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from numbers import Real
from typing import Any

import numpy as np

from spear_engine.envs.base import Observation, StepResult

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CallOutcome:
    """What one guarded call gave: its value, the exception it raised, or that it ran out of time."""

    value: Any = None
    error: BaseException | None = None
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None and not self.timed_out


def run_with_deadline(
    calls: Sequence[Callable[[], Any]], workers: int, timeout_s: float | None
) -> list[CallOutcome]:
    """Run ``calls`` concurrently (at most ``workers`` at once), each with ``timeout_s`` seconds from its
    own start (None: no limit); returns one outcome per call, in order. Never raises for a call."""
    outcomes: list[CallOutcome | None] = [None] * len(calls)
    finished: queue.SimpleQueue[tuple[int, CallOutcome]] = queue.SimpleQueue()
    pending = deque(range(len(calls)))
    running: dict[int, float] = {}  # call index -> start time

    def work(i: int) -> None:
        try:
            finished.put((i, CallOutcome(value=calls[i]())))
        except BaseException as err:  # an env fault of any kind is reported, never raised here
            finished.put((i, CallOutcome(error=err)))

    while pending or running:
        while pending and len(running) < max(1, workers):
            i = pending.popleft()
            running[i] = time.monotonic()
            threading.Thread(target=work, args=(i,), name=f"spear-env-call-{i}", daemon=True).start()
        wait = None if timeout_s is None else max(0.0, min(running.values()) + timeout_s - time.monotonic())
        try:
            i, outcome = finished.get(timeout=wait)
        except queue.Empty:
            now = time.monotonic()
            for i, started in list(running.items()):
                if timeout_s is not None and now - started >= timeout_s:
                    outcomes[i] = CallOutcome(timed_out=True)
                    del running[i]
            continue
        if i in running:  # a late answer of an abandoned call is dropped
            del running[i]
            outcomes[i] = outcome
    return [o if o is not None else CallOutcome(timed_out=True) for o in outcomes]


def _is_flag(value: Any) -> bool:
    return isinstance(value, (bool, np.bool_)) or (isinstance(value, (int, np.integer)) and value in (0, 1))


def observation_problem(observation: Any) -> str | None:
    """Why ``observation`` is not a usable :class:`Observation`, or None."""
    if not isinstance(observation, Observation):
        return f"expected an Observation, got {type(observation).__name__}"
    if not isinstance(observation.text, str) or not isinstance(observation.task, str):
        return f"observation text and task must be str, got {type(observation.text).__name__} and " \
               f"{type(observation.task).__name__}"  # fmt: skip
    actions = observation.admissible_actions
    if actions is not None and not (isinstance(actions, list) and all(isinstance(a, str) for a in actions)):
        return "admissible_actions must be None or a list of str"
    return None


def step_result_problem(result: Any) -> str | None:
    """Why ``result`` is not a well-formed :class:`StepResult` (wrong type, non-finite reward, a flag that
    is not a bool, a bad observation), or None."""
    if not isinstance(result, StepResult):
        return f"expected a StepResult, got {type(result).__name__}"
    reward = result.reward
    if isinstance(reward, (bool, np.bool_)) or not isinstance(reward, Real):
        return f"reward must be a number, got {type(reward).__name__}"
    if not math.isfinite(float(reward)):
        return f"reward must be finite, got {float(reward)}"
    for name in ("done", "won", "action_valid"):
        if not _is_flag(getattr(result, name)):
            return f"{name} must be a bool, got {getattr(result, name)!r}"
    if not isinstance(result.info, dict):
        return f"info must be a dict, got {type(result.info).__name__}"
    return observation_problem(result.observation)


def close_quietly(env: Any) -> threading.Thread:
    """Close a broken env on a daemon thread (its close may hang too); errors are logged, not raised."""

    def close() -> None:
        try:
            env.close()
        except BaseException as err:
            _log.warning("closing a broken environment failed: %r", err)

    thread = threading.Thread(target=close, name="spear-env-close", daemon=True)
    thread.start()
    return thread
