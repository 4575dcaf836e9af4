"""The environment protocol: text in, text out, seeded, with train/eval splits and a gold path.

Environments know nothing of tokens or models. The agent loop parses the policy's text into an
:class:`Action` (``kind`` says what was parsed: an env command, a Python tool call, a final answer)
and hands it to :meth:`Env.step`; the env answers with an observation text, a reward and whether the
episode is over and won. ``gold_actions`` is the planner's / task's solution path, so tests can check
that every environment is winnable.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, runtime_checkable

SPLITS = ("train", "eval")


@dataclass(frozen=True)
class Action:
    """What the agent loop parsed from one policy response."""

    kind: str
    """``"command"`` (a text-game action / a WebShop ``search[...]`` or ``click[...]``), ``"python"`` (code
    for the Python tool), ``"answer"`` (a final answer), or ``"invalid"`` (nothing parseable)."""
    text: str = ""


@dataclass
class Observation:
    """What the agent sees after reset or a step."""

    text: str
    task: str = ""
    """The task description (repeated in every prompt of the step layout)."""
    admissible_actions: list[str] | None = None
    """Valid commands when the env can list them (ALFWorld, TextWorldExpress), else None."""


@dataclass
class StepResult:
    observation: Observation
    reward: float
    done: bool
    won: bool
    action_valid: bool
    """False when the env could not use the action (unknown command, invalid kind): the invalid-action penalty."""
    info: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Env(Protocol):
    """One episode at a time; ``reset`` starts a new one from a seed of a split."""

    name: str
    max_steps: int

    def reset(self, seed: int, split: str = "train") -> Observation: ...

    def step(self, action: Action) -> StepResult: ...

    def gold_actions(self) -> list[Action]:
        """A winning action sequence for the current episode (planner / generator solution)."""
        ...

    def close(self) -> None: ...


_Closable = TypeVar("_Closable", bound="ClosableEnv")


class ClosableEnv:
    """The context-manager and closed-check boilerplate of an env that holds a resource.

    ``with make_env(...) as env:`` closes the env on the way out. An env whose methods must refuse to
    run once closed overrides :meth:`_is_closed` and calls :meth:`_check_open` first; the error names
    the env by its ``name``. An env that counts its steps in ``_steps`` and ends episodes with ``_done``
    starts each step with :meth:`_start_step`.
    """

    name: str
    _steps: int
    _done: bool

    def close(self) -> None:  # pragma: no cover - every env defines its own
        raise NotImplementedError

    def _is_closed(self) -> bool:
        return False

    def _check_open(self) -> None:
        if self._is_closed():
            raise RuntimeError(f"this {self.name} env is closed")

    def _start_step(self) -> None:
        """Refuse a step on a closed env or a finished episode, then count the step."""
        self._check_open()
        if self._done:
            raise RuntimeError("the episode is over; call reset() first")
        self._steps += 1

    def __enter__(self: _Closable) -> _Closable:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


EnvFactory = Callable[..., Env]
_REGISTRY: dict[str, EnvFactory] = {}


def register_env(name: str) -> Callable[[EnvFactory], EnvFactory]:
    def decorator(factory: EnvFactory) -> EnvFactory:
        _REGISTRY[name] = factory
        return factory

    return decorator


def available_envs() -> list[str]:
    _import_builtin_envs()
    return sorted(_REGISTRY)


def make_env(name: str, **kwargs: Any) -> Env:
    """Build a registered environment by name (``alfworld``, ``webshop``, ``math``, ``twx``)."""
    _import_builtin_envs()
    if name not in _REGISTRY:
        raise ValueError(f"unknown environment '{name}'; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](**kwargs)


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split '{split}'; expected one of {', '.join(SPLITS)}")


def _import_builtin_envs() -> None:
    """Import the built-in env modules so that they register themselves (lazily: some need Java)."""
    import importlib

    for module in ("alfworld", "webshop", "math_tool", "twx"):
        try:
            importlib.import_module(f"spear_engine.envs.{module}")
        except ModuleNotFoundError as err:
            if not err.name or not err.name.startswith("spear_engine.envs"):
                raise
