"""ALFWorld: the real ALFWorld text engine on procedurally generated household tasks.

The engine is TextWorld's PDDL engine (``textworld[pddl]``, planner: fast-downward) with the ``alfred``
domain and ``alfred.twl2`` text grammar shipped in the ``alfworld`` wheel, wrapped by alfworld's own
``AlfredDemangler`` / ``AlfredInfos``: observations, commands and success are exactly ALFWorld's
("You are in the middle of a room. Looking quickly around you, you see ...", "go to fridge 1",
"take apple 1 from countertop 1", "Nothing happens."). The games are generated offline by
:mod:`spear_engine.envs.alfworld_tasks` (the official game files are downloads we cannot reach).

Contract (see :mod:`spear_engine.envs.base`):

- ``reset(seed, split)``: the problem for ``(split, seed)`` — deterministic; train and eval seeds hash into
  unrelated generator streams (``sha256("alfworld/<split>/<seed>")``), so the splits do not share tasks.
  The observation text is ALFWorld's first observation without TextWorld's "-= Welcome ... =-" banner;
  ``task`` is the sentence after "Your task is to: " (with its final period, as verl-agent extracts it).
- ``step``: a ``"command"`` Action whose text (whitespace-collapsed, lower-cased) is an admissible
  command is played; anything else (an unknown command, or another Action kind) is ``action_valid=False``
  with ALFWorld's answer "Nothing happens." and an unchanged state. Every call counts as a step.
- reward 10.0 at the step the engine reports ``won`` (the verl-agent ALFWorld reward), else 0.0; the
  episode ends when won or after ``max_steps`` steps (default 50).
- ``gold_actions()``: the planner's walkthrough computed at reset (fast-downward, optimal under the
  domain's action costs).
- ``admissible_actions``: the engine's admissible commands, sorted, without ``help`` unless
  ``include_help=True`` (verl-agent hides ``help`` from the policy; the command still works).

Game files (``{"pddl_domain", "grammar", "pddl_problem"}``) are written once per process into a temporary
folder (removed at exit) and reused when a seed comes back. Text rendering speed: TextWorld re-parses the
same grammar snippets and deep-copies its render context for every symbol on every step;
:func:`install_text_speedups` (on by default, ``fast_text=False`` to skip) memoises the parsers and copies
the context shallowly — the text is unchanged (the tests compare transcripts) and steps get several times
faster.
"""

from __future__ import annotations

import atexit
import copy
import functools
import hashlib
import json
import os
import shutil
import tempfile
import threading
from typing import Any

from spear_engine.envs.alfworld_tasks import (
    TASK_TYPES,
    generate_problem,
    normalize_task_types,
    problem_pddl,
)
from spear_engine.envs.base import Action, ClosableEnv, Observation, StepResult, check_split, register_env

WIN_REWARD = 10.0
NOTHING_HAPPENS = "Nothing happens."
_BANNER = "-= Welcome to TextWorld, ALFRED! =-"
_TASK_PREFIX = "Your task is to: "
INSTALL_HINT = "pip install alfworld==0.4.2  (it pulls textworld[pddl]: the PDDL engine and fast-downward)"


def _require_engine() -> None:
    """Fail early, naming the pip command, when alfworld / textworld[pddl] are missing."""
    try:
        import alfworld  # noqa: F401
        import fast_downward  # noqa: F401
        import textworld  # noqa: F401
    except ImportError as err:
        raise ImportError(f"the 'alfworld' environment needs the ALFWorld text engine: {INSTALL_HINT}") from err


@functools.cache
def _alfred_logic() -> tuple[str, str]:
    """The ``alfred.pddl`` domain and ``alfred.twl2`` grammar shipped in the alfworld wheel."""
    from importlib.resources import files

    data = files("alfworld") / "data"
    return (data / "alfred.pddl").read_text(), (data / "alfred.twl2").read_text()


# --- game-file cache (one temporary folder per process) -------------------------------------------------

_CACHE_LOCK = threading.Lock()
_ENGINE_LOCK = threading.RLock()
"""Serialises every TextWorld / fast-downward call in the process: their parsers (tatsu) and the
translator keep global state, so two envs loading or stepping in parallel threads (the agent loop's
guarded env calls) corrupt each other ("pop from empty list") and leak the translator's log to stdout."""
_CACHE_DIRS: dict[int, str] = {}


def _cache_dir() -> str:
    """This process's folder of generated games (a forked child gets its own)."""
    pid = os.getpid()
    with _CACHE_LOCK:
        if pid not in _CACHE_DIRS:
            path = tempfile.mkdtemp(prefix=f"spear_alfworld_{pid}_")
            _CACHE_DIRS[pid] = path
            atexit.register(_remove_cache_dir, pid, path)
        return _CACHE_DIRS[pid]


def _remove_cache_dir(pid: int, path: str) -> None:
    if os.getpid() == pid:
        shutil.rmtree(path, ignore_errors=True)


def game_file(seed: int, split: str, task_types: tuple[str, ...] = TASK_TYPES) -> tuple[str, dict[str, Any]]:
    """Path of the tw-pddl game for ``(split, seed, task_types)``, generated on first use; and its metadata."""
    tag = "all" if set(task_types) == set(TASK_TYPES) else hashlib.sha1(",".join(task_types).encode()).hexdigest()[:8]
    path = os.path.join(_cache_dir(), f"{split}-{int(seed)}-{tag}.tw-pddl")
    meta_path = path[: -len(".tw-pddl")] + ".meta.json"
    if os.path.exists(path) and os.path.exists(meta_path):
        with open(meta_path) as f:
            return path, json.load(f)
    problem = generate_problem(seed, split, task_types)
    domain, grammar = _alfred_logic()
    game = {
        "pddl_domain": domain,
        "grammar": grammar.replace("UNKNOWN GOAL", problem.task),
        "pddl_problem": problem_pddl(problem, name=f"spear_{split}_{int(seed)}"),
        "solvable": True,
    }
    meta = {"task_type": problem.task_type, "room": problem.room, "task": problem.task}
    _write_atomic(path, game)
    _write_atomic(meta_path, meta)
    return path, meta


def _write_atomic(path: str, data: dict[str, Any]) -> None:
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


# --- TextWorld speed-ups: memoise two pure parsers, copy render contexts shallowly ---------------------------

_SPEEDUP_STATE: dict[str, Any] = {}


def install_text_speedups() -> None:
    """Make TextWorld's text rendering and game loading faster without changing its output (process-wide,
    idempotent; the game translation cache is :func:`_patch_translation`).

    Every step, TextWorld's PDDL engine renders each admissible command and the feedback by (1) parsing
    the same few dozen grammar strings and logic queries again, and (2) deep-copying the render context,
    entity descriptions included, for every symbol. Both parsers are pure, so we memoise them (the grammar
    parser's result is mutated by its caller, so callers get a copy of the cached tree). The context's
    entity descriptions and PDDL variables are only read while rendering (its two dicts are updated, never
    the objects in them), so copying the dicts is enough. The tests compare transcripts with and without.
    """
    with _CACHE_LOCK:
        if not _SPEEDUP_STATE:
            _patch_textworld()


def _patch_textworld() -> None:
    import textworld.envs.pddl.textgen as textgen
    from textworld.logic import Rule

    original_parse = textgen._parse_and_convert
    original_query = Rule.__dict__["parse_conjunctive_query"]
    original_copy_context = textgen.copy_context

    @functools.lru_cache(maxsize=8192)
    def cached_parse(text: str, kwargs: tuple) -> Any:
        return original_parse(text, **dict(kwargs))

    def parse(text: Any, **kwargs: Any) -> Any:
        try:
            result = cached_parse(text, tuple(sorted(kwargs.items())))
        except TypeError:  # unhashable argument: parse directly
            return original_parse(text, **kwargs)
        return copy.deepcopy(result)

    @functools.lru_cache(maxsize=8192)
    def cached_query(expr: str) -> Any:
        return original_query.__func__(Rule, expr)

    def shallow_copy_context(context: dict[str, Any]) -> dict[str, Any]:
        return {**context, "variables": dict(context["variables"]), "mapping": dict(context["mapping"])}

    textgen._parse_and_convert = parse
    textgen.copy_context = shallow_copy_context
    Rule.parse_conjunctive_query = classmethod(lambda cls, expr: cached_query(expr))
    _SPEEDUP_STATE.update(textgen=textgen, rule=Rule, parse=original_parse, query=original_query,
                          copy_context=original_copy_context)
    _patch_translation()


def _patch_translation() -> None:
    """Memoise fast-downward's PDDL -> SAS translation per (domain, problem).

    Loading a game translates its problem twice (plain and optimised for replanning): ~80 % of a reset.
    The envs of one GRPO group all load the same game, so the group pays for one translation instead of
    ``n``. The translation is a pure function of its text inputs; its task object is deep-copied for
    each caller (TextWorld reads it while building the state), its SAS text is immutable.
    """
    import fast_downward

    original = fast_downward.pddl2sas

    @functools.lru_cache(maxsize=128)
    def cached(domain: str, problem: str, verbose: bool, optimize: bool) -> Any:
        return original(domain, problem, verbose=verbose, optimize=optimize)

    def translate(domain: str, problem: str, verbose: bool = False, optimize: bool = False) -> Any:
        task, sas = cached(domain, problem, bool(verbose), bool(optimize))
        return copy.deepcopy(task), sas

    fast_downward.pddl2sas = translate
    _SPEEDUP_STATE.update(fast_downward=fast_downward, pddl2sas=original)


def remove_text_speedups() -> None:
    """Undo :func:`install_text_speedups` (the tests compare both)."""
    with _CACHE_LOCK:
        if not _SPEEDUP_STATE:
            return
        _SPEEDUP_STATE["textgen"]._parse_and_convert = _SPEEDUP_STATE["parse"]
        _SPEEDUP_STATE["textgen"].copy_context = _SPEEDUP_STATE["copy_context"]
        _SPEEDUP_STATE["rule"].parse_conjunctive_query = _SPEEDUP_STATE["query"]
        _SPEEDUP_STATE["fast_downward"].pddl2sas = _SPEEDUP_STATE["pddl2sas"]
        _SPEEDUP_STATE.clear()


# --- the engine ---------------------------------------------------------------------------------------------


def _make_engine() -> Any:
    """TextWorld's PDDL env wrapped like ALFWorld's AlfredTWEnv (demangled names, gamefile info)."""
    import textworld
    from alfworld.agents.environment.alfred_tw_env import AlfredDemangler, AlfredInfos
    from textworld.envs.pddl.pddl import PddlEnv

    class _ReusingPddlEnv(PddlEnv):
        """Build the planner state once per load: ``reset`` right after ``load`` reuses load's fresh state.

        Stock PddlEnv translates the problem with fast-downward in ``load`` and again in every ``reset``.
        """

        def load(self, filename_or_data: Any) -> None:
            super().load(filename_or_data)
            self._pristine_state = self._pddl_state

        def reset(self) -> Any:
            pristine, self._pristine_state = getattr(self, "_pristine_state", None), None
            if pristine is None:
                return super().reset()
            return _reset_with_state(self, pristine)

    infos = textworld.EnvInfos(won=True, admissible_commands=True, extras=["gamefile", "walkthrough"])
    base = _ReusingPddlEnv(infos)
    return AlfredInfos(AlfredDemangler(base)), base


def _reset_with_state(env: Any, pddl_state: Any) -> Any:
    """PddlEnv.reset, but on an already-built (untouched) planner state."""
    from textworld.core import GameState

    env._pddl_state = pddl_state
    env.prev_state = None
    env.state = GameState()
    env._last_action = None
    env._moves = 0
    context = {"state": pddl_state, "facts": list(pddl_state.facts), "variables": {}, "mapping": {},
               "entity_infos": env._entity_infos}
    env.state.feedback = env._logic.grammar.derive("#intro#", context)
    env.state.raw = env.state.feedback
    env._gather_infos()
    env.state["extra.walkthrough"] = env.walkthrough or pddl_state.replan(env._entity_infos)
    return env.state


def _first_observation(feedback: str) -> tuple[str, str]:
    """(observation text without TextWorld's banner, task sentence)."""
    text = feedback.strip()
    if text.startswith(_BANNER):
        text = text[len(_BANNER):].strip()
    start = text.find(_TASK_PREFIX)
    task = text[start + len(_TASK_PREFIX):].strip() if start >= 0 else ""
    return text, task


def normalize_command(text: str) -> str:
    """ALFWorld commands are lower-case words separated by single spaces."""
    return " ".join(text.strip().lower().split())


@register_env("alfworld")
class AlfWorldEnv(ClosableEnv):
    """One ALFWorld episode at a time on generated games; see the module docstring for the contract."""

    name = "alfworld"

    def __init__(
        self,
        max_steps: int = 50,
        task_types: list[str] | tuple[str, ...] | None = None,
        include_help: bool = False,
        win_reward: float = WIN_REWARD,
        fast_text: bool = True,
    ) -> None:
        """``task_types``: a subset of the six (names, short aliases or ALFWorld's ids 1..6); default all."""
        if max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        _require_engine()
        self.max_steps = int(max_steps)
        self.task_types = normalize_task_types(task_types)
        self.include_help = include_help
        self.win_reward = float(win_reward)
        if fast_text:
            install_text_speedups()
        with _ENGINE_LOCK:
            self._engine, self._pddl_env = _make_engine()
        self._loaded: str | None = None
        self._state: Any = None
        self._meta: dict[str, Any] = {}
        self._task = ""
        self._gold: list[str] = []
        self._steps = 0
        self._done = True

    # --- protocol ---

    def reset(self, seed: int, split: str = "train") -> Observation:
        check_split(split)
        self._check_open()
        with _ENGINE_LOCK:
            path, self._meta = game_file(seed, split, self.task_types)
            if path != self._loaded:
                self._loaded = None  # a load that raises leaves no half-loaded game marked as current
                self._engine.load(path)
                self._loaded = path
            self._state = self._engine.reset()
        text, self._task = _first_observation(self._state.feedback)
        self._gold = list(self._state["extra.walkthrough"] or [])
        if not self._gold:
            raise RuntimeError(f"the planner found no solution for alfworld {split} seed {seed} (generator bug)")
        self._steps, self._done = 0, False
        return self._observation(text)

    def step(self, action: Action) -> StepResult:
        self._start_step()
        command = normalize_command(action.text) if action.kind == "command" else ""
        valid = bool(command) and command in self._state["admissible_commands"]
        if valid:
            with _ENGINE_LOCK:
                self._state, _, _ = self._engine.step(command)
            feedback = self._state.feedback.strip()
        else:
            feedback = NOTHING_HAPPENS
        won = bool(self._state["won"]) and valid
        self._done = won or self._steps >= self.max_steps
        info = {
            "won": won,
            "steps": self._steps,
            "truncated": self._done and not won,
            "task_type": self._meta.get("task_type"),
            "gamefile": self._loaded,
        }
        return StepResult(self._observation(feedback), self.win_reward if won else 0.0, self._done, won, valid, info)

    def gold_actions(self) -> list[Action]:
        """The planner's walkthrough from the start of the current episode."""
        return [Action("command", c) for c in self._gold]

    def close(self) -> None:
        """Release the engine and free the planner state of its private fast-downward library copy.

        The library itself stays mapped: ``dlclose`` of this C++ library leaves its static destructors
        registered with the process, and they crash the interpreter at exit (segfault, exit code 139).
        """
        if self._engine is None:
            return
        lib = getattr(self._pddl_env, "downward_lib", None)
        self._engine = self._pddl_env = self._state = None
        if lib is not None:
            with _ENGINE_LOCK:
                lib.cleanup()

    # --- helpers ---

    @property
    def task_type(self) -> str | None:
        """The task type of the current episode."""
        return self._meta.get("task_type")

    def _observation(self, text: str) -> Observation:
        admissible = list(self._state["admissible_commands"])
        if not self.include_help:
            admissible = [c for c in admissible if c != "help"]
        return Observation(text=text, task=self._task, admissible_actions=admissible)

    def _is_closed(self) -> bool:
        return self._engine is None
