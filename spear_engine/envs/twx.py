"""TextWorldExpress: fast procedurally generated text games (twc, cookingworld, coin, ...), offline.

``textworld-express`` ships its simulator as a jar and runs it in a JVM through py4j; each env instance
starts its own JVM (about 0.2 s) and :meth:`TWXEnv.close` stops it (the tests check that no process is
left). Contract (see :mod:`spear_engine.envs.base`):

- games: ``twc`` (TextWorld-Commonsense: put things where they belong), ``cookingworld``, ``coin``,
  ``mapreader``, ``arithmetic``, ``sorting``, ``simonsays``, ``peckingorder``. ``game_params`` are TWX's
  generation properties (``"numLocations=1,numItemsToPutAway=2"`` or a dict); unknown ones raise.
- seeds and splits: TWX's official folds are train seeds 0–999, dev 10000–10999, test 20000–20999, and the
  fold also picks the object set (``gameSet``). Our ``train`` split plays fold ``train`` with game seed
  ``s`` for ``s < 10000`` and ``s + 20000`` above, and ``eval`` plays fold ``eval_fold`` (``dev`` by default,
  or ``test``) with game seed ``10000 + s`` (dev) / ``20000 + s`` (test) for ``0 <= s < 10000``. The game
  seeds of the two splits never meet, and eval seeds 0–999 are exactly TWX's official dev/test games.
- ``admissible_actions``: TWX's ``validActions``, sorted. A ``"command"`` Action whose text
  (whitespace-collapsed; case-insensitive) is not among them — or any other Action kind — is
  ``action_valid=False``, answered with TWX's "Unknown action" text and not sent to the game.
- reward 10.0 at the step TWX reports ``tasksuccess`` (the same outcome reward as ALFWorld), else 0.0;
  TWX's own partial score (0..1) is in ``info["score"]``. Done on success, on ``taskfailure`` (e.g. eating
  the wrong meal) or after ``max_steps`` steps (default 100, TWX's own step limit).
- ``gold_actions()``: ``getGoldActionSequence()`` of the current game, cut at the winning step. The game
  is a pure function of the seed, but TWX's gold agent is not seeded: the path for one game can differ
  from one reset to the next (every one of them wins).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

from spear_engine.envs.base import Action, ClosableEnv, Observation, StepResult, check_split, register_env

WIN_REWARD = 10.0
GAMES = ("twc", "cookingworld", "coin", "mapreader", "arithmetic", "sorting", "simonsays", "peckingorder")
UNKNOWN_ACTION = "Unknown action: I'm not sure what you mean."
INSTALL_HINT = "pip install textworld-express==1.1.0  (and a Java >= 8 runtime on PATH)"

FOLD_BASE = {"train": 0, "dev": 10000, "test": 20000}
FOLD_SPAN = 10000
"""Each fold owns a block of 10000 game seeds (TWX's official seeds are the first 1000 of each block)."""
_TWX_STEP_LIMIT = 10**9
"""We count steps ourselves; TWX's own limit is set out of reach."""


def game_seed(seed: int, split: str, eval_fold: str = "dev") -> tuple[str, int]:
    """(TWX fold, TWX game seed) for one of our ``(split, seed)``; see the module docstring."""
    check_split(split)
    seed = int(seed)
    if seed < 0:
        raise ValueError(f"seeds must be >= 0, got {seed}")
    if split == "train":
        return "train", seed if seed < FOLD_SPAN else seed + 2 * FOLD_SPAN
    if eval_fold not in ("dev", "test"):
        raise ValueError(f"eval_fold must be 'dev' or 'test', got '{eval_fold}'")
    if seed >= FOLD_SPAN:
        raise ValueError(f"twx eval seeds must be < {FOLD_SPAN} (one fold's block), got {seed}")
    return eval_fold, FOLD_BASE[eval_fold] + seed


def format_params(params: str | Mapping[str, Any] | None) -> str:
    """TWX's ``gameParams`` string from a string or a mapping (booleans become 0/1)."""
    if params is None:
        return ""
    if isinstance(params, str):
        return params.replace(" ", "")
    return ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in params.items())


def normalize_command(text: str) -> str:
    """Collapse whitespace (TWX commands are words separated by single spaces; some keep capitals)."""
    return " ".join(text.strip().split())


def match_command(text: str, valid_actions: list[str]) -> str | None:
    """The valid action the text names: exact match first, then ignoring case; None if none."""
    command = normalize_command(text)
    if command in valid_actions:
        return command
    lowered = command.lower()
    return next((a for a in valid_actions if a.lower() == lowered), None)


def _start_simulator() -> Any:
    try:
        from textworld_express import TextWorldExpressEnv
    except ImportError as err:
        raise ImportError(f"the 'twx' environment needs TextWorldExpress: {INSTALL_HINT}") from err
    try:
        return TextWorldExpressEnv(envStepLimit=_TWX_STEP_LIMIT)
    except Exception as err:  # py4j cannot launch the JVM
        raise RuntimeError(f"could not start the TextWorldExpress JVM (is Java installed?): {err}") from err


@register_env("twx")
class TWXEnv(ClosableEnv):
    """One TextWorldExpress episode at a time; see the module docstring for the contract."""

    name = "twx"

    def __init__(
        self,
        game: str = "twc",
        game_params: str | Mapping[str, Any] | None = None,
        max_steps: int = 100,
        eval_fold: str = "dev",
        win_reward: float = WIN_REWARD,
    ) -> None:
        if game not in GAMES:
            raise ValueError(f"unknown TextWorldExpress game '{game}'; expected one of {', '.join(GAMES)}")
        if max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        if eval_fold not in ("dev", "test"):
            raise ValueError(f"eval_fold must be 'dev' or 'test', got '{eval_fold}'")
        self.game = game
        self.game_params = format_params(game_params)
        self.max_steps = int(max_steps)
        self.eval_fold = eval_fold
        self.win_reward = float(win_reward)
        self._sim = _start_simulator()
        self._process = self._sim._gateway.java_process
        self._loaded = False
        self._infos: dict[str, Any] = {}
        self._task = ""
        self._game_id: tuple[str, int] = ("train", 0)
        self._gold: list[str] = []
        self._gold_trimmed = False
        self._history: list[str] = []
        self._steps = 0
        self._done = True

    # --- protocol ---

    def reset(self, seed: int, split: str = "train") -> Observation:
        self._check_open()
        fold, twx_seed = game_seed(seed, split, self.eval_fold)
        kwargs = {} if self._loaded else {"gameName": self.game, "gameParams": self.game_params}
        try:
            obs, self._infos = self._sim.reset(seed=twx_seed, gameFold=fold, generateGoldPath=True, **kwargs)
        except Exception as err:  # py4j wraps the simulator's complaint (e.g. an unknown game property)
            raise ValueError(f"TextWorldExpress rejected game '{self.game}' with '{self.game_params}': {err}") from err
        self._loaded = True
        self._game_id = (fold, twx_seed)
        self._task = self._infos.get("taskDescription", "")
        self._gold = list(self._sim.getGoldActionSequence())
        self._gold_trimmed = False
        self._history: list[str] = []
        self._steps, self._done = 0, False
        return self._observation(obs)

    def step(self, action: Action) -> StepResult:
        self._start_step()
        command = match_command(action.text, self._infos["validActions"]) if action.kind == "command" else None
        valid = command is not None
        if valid:
            text, _, _, self._infos = self._sim.step(command)
            self._history.append(command)
        else:
            text = UNKNOWN_ACTION
        won = valid and bool(self._infos.get("tasksuccess"))
        failed = valid and bool(self._infos.get("taskfailure"))
        self._done = won or failed or self._steps >= self.max_steps
        info = {
            "won": won,
            "failed": failed,
            "score": float(self._infos.get("score", 0.0)),
            "steps": self._steps,
            "truncated": self._done and not (won or failed),
            "game": self.game,
        }
        return StepResult(self._observation(text), self.win_reward if won else 0.0, self._done, won, valid, info)

    def gold_actions(self) -> list[Action]:
        """TWX's gold action sequence for the current game (from its start), cut at the winning step.

        TWX's gold paths can go on after the task is complete (twc walks back out of the last room); the
        first call replays the path on the simulator to cut it, then replays this episode's actions so far
        to restore the current state (TWX is deterministic).
        """
        if not self._gold_trimmed:
            self._gold = self._winning_prefix()
            self._gold_trimmed = True
        return [Action("command", c) for c in self._gold]

    def close(self) -> None:
        """Shut the py4j gateway down and make sure the JVM has exited."""
        sim, self._sim = self._sim, None
        if sim is None:
            return
        with contextlib.suppress(Exception):  # the gateway may already be gone; the process check still runs
            sim.close()
        sim.close = lambda: None  # its __del__ calls close() again
        process = self._process
        if process is not None and process.poll() is None:
            try:
                process.wait(timeout=5)
            except Exception:
                process.kill()
                process.wait(timeout=5)
        if process is not None:
            for stream in (process.stdin, process.stdout, process.stderr):
                if stream is not None:
                    stream.close()

    # --- helpers ---

    def _winning_prefix(self) -> list[str]:
        fold, twx_seed = self._game_id
        self._sim.reset(seed=twx_seed, gameFold=fold, generateGoldPath=True)
        prefix = list(self._gold)
        for i, command in enumerate(self._gold):
            _, _, _, infos = self._sim.step(command)
            if infos.get("tasksuccess"):
                prefix = self._gold[: i + 1]
                break
        _, self._infos = self._sim.reset(seed=twx_seed, gameFold=fold, generateGoldPath=True)
        for command in self._history:
            _, _, _, self._infos = self._sim.step(command)
        return prefix

    @property
    def jvm_pid(self) -> int | None:
        """Process id of this env's JVM (for leak checks)."""
        return None if self._process is None else self._process.pid

    def _observation(self, text: str) -> Observation:
        actions = sorted(self._infos.get("validActions", []))
        return Observation(text=text.strip(), task=self._task, admissible_actions=actions)

    def _is_closed(self) -> bool:
        return self._sim is None
