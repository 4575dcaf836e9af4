"""Math / reasoning tasks from reasoning-gym, solved with a sandboxed Python tool over several turns.

Actions:
  ``Action("python", code)``  runs ``code`` in :mod:`spear_engine.envs.sandbox`; the observation is its
      stdout, the last lines of any traceback, and why it was stopped (timeout, output limit, ...).
      Code that does not compile is an invalid action (the SyntaxError is shown, no tool call is
      counted); code that compiles counts as a tool call in ``info["tool_calls"]`` even if it raises.
  ``Action("answer", text)``  ends the episode; ``text`` is scored by the task's own verifier
      (``dataset.score_answer``) and, when the gold answer is a number and the verifier gave less
      than 1, by math-verify as a fallback.
  anything else is invalid (the step counts, nothing changes).
Reward: 1.0 at the answer step when the score is >= 1.0 (``won``), else 0.0. reasoning-gym gives
partial scores for well-formed wrong answers (countdown 0.05, gsm_symbolic 0.01), so only a full
score counts as solved. Reaching ``max_steps`` without an answer ends the episode with 0.

Splits: reasoning-gym seeds item ``i`` of a dataset with ``seed + i``; each episode builds a one-item
dataset seeded ``2·seed`` (train) or ``2·seed + 1`` (eval), so the two splits never share a generator seed.

Safety of scoring: several reasoning-gym verifiers ``eval`` the answer or run sympy's ``parse_expr``
on it (countdown, puzzle24, n_queens, ...), which would run policy-written code in the trainer. The
answer is scored in-process only when that is harmless: the verifier is the base class's string
comparison or audited (gsm_symbolic), or the answer is plain arithmetic (digits, ``+-*/().,``,
no ``**``). Otherwise the verifier runs in the sandbox (``math_score_child.py`` in a fresh
interpreter, about 1–3 s). math-verify runs in-process only on answers without ``^``, ``**``, ``!``,
braces or LaTeX commands (bounded work); other answers go to the sandbox too.
"""

from __future__ import annotations

import functools
import json
import logging
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from spear_engine.envs.base import Action, Observation, StepResult, check_split, register_env
from spear_engine.envs.sandbox import MAX_CODE_BYTES, run_python

DEFAULT_TASKS = ("countdown", "gsm_symbolic")
MAX_ANSWER_CHARS = 1000
SUCCESS_THRESHOLD = 1.0
AUDITED_SAFE_VERIFIERS = frozenset({"gsm_symbolic"})
"""Verifiers read and found to treat the answer as data (regex + float), whatever it contains."""
_PLAIN_ARITHMETIC = re.compile(r"^[0-9+\-*/().,\s]{1,200}$")
_BOXED_PLAIN = re.compile(r"\\boxed\{([0-9+\-*/().,\s]*)\}")
_INSTALL_HINT = "pip install reasoning-gym==0.1.25 math-verify==0.9.0"
_log = logging.getLogger(__name__)


def _import_reasoning_gym() -> Any:
    try:
        import reasoning_gym
    except ImportError as err:
        raise ImportError(f"the math environment needs reasoning-gym: {_INSTALL_HINT}") from err
    return reasoning_gym


def _import_math_verify() -> tuple[Any, Any]:
    try:
        from math_verify import parse, verify
    except ImportError as err:
        raise ImportError(f"the math environment needs math-verify: {_INSTALL_HINT}") from err
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # we run it without its signal timeouts
    return parse, verify


@register_env("math")
class MathToolEnv:
    """reasoning-gym tasks by name; ``tasks`` is one name or several (the seed picks one per episode)."""

    name = "math"

    def __init__(
        self,
        tasks: str | Sequence[str] = DEFAULT_TASKS,
        max_steps: int = 8,
        dataset_kwargs: dict[str, dict[str, Any]] | None = None,
        tool_timeout_s: float = 5.0,
        tool_memory_mb: int = 512,
        max_observation_chars: int = 2000,
        sandbox_isolation: str | None = None,
    ) -> None:
        self.tasks = (tasks,) if isinstance(tasks, str) else tuple(tasks)
        if not self.tasks:
            raise ValueError("tasks must name at least one reasoning-gym dataset")
        self.max_steps = max_steps
        self.dataset_kwargs = dict(dataset_kwargs or {})
        self.tool_timeout_s = tool_timeout_s
        self.tool_memory_mb = tool_memory_mb
        self.max_observation_chars = max_observation_chars
        self.sandbox_isolation = sandbox_isolation
        self._rg = _import_reasoning_gym()
        self._parse, self._verify = _import_math_verify()
        unknown = [t for t in self.tasks if t not in self._rg.factory.DATASETS]
        if unknown:
            raise ValueError(f"unknown reasoning-gym dataset(s) {unknown}; see reasoning_gym.factory.DATASETS")
        self._dataset: Any = None
        self._entry: dict[str, Any] | None = None
        self._spec: dict[str, Any] = {}
        self._steps = 0
        self._tool_calls = 0
        self._done = False

    # ------------------------------------------------------------------ protocol

    def reset(self, seed: int, split: str = "train") -> Observation:
        check_split(split)
        rng = random.Random(f"math-{split}-{seed}")
        task = self.tasks[rng.randrange(len(self.tasks))]
        dataset_seed = 2 * seed + (split == "eval")
        kwargs = self.dataset_kwargs.get(task, {})
        self._dataset = self._rg.create_dataset(task, seed=dataset_seed, size=1, **kwargs)
        self._entry = self._dataset[0]
        self._spec = {"name": task, "seed": dataset_seed, "kwargs": kwargs}
        self._steps = 0
        self._tool_calls = 0
        self._done = False
        return self._observation(self._entry["question"])

    def step(self, action: Action) -> StepResult:
        if self._entry is None or self._done:
            raise RuntimeError("the episode is over (or never started): call reset()")
        self._steps += 1
        if action.kind == "answer":
            return self._answer(action.text)
        if action.kind == "python":
            text, valid, extra = self._python(action.text)
        else:
            text, valid, extra = "Invalid action: run code with the python tool or give a final answer.", False, {}
        truncated = self._steps >= self.max_steps
        self._done = truncated
        info = {"tool_calls": self._tool_calls, "truncated": truncated, "task": self._spec["name"], **extra}
        return StepResult(self._observation(text), 0.0, truncated, False, valid, info)

    def gold_actions(self) -> list[Action]:
        """A Python call that computes (countdown) or prints the gold answer, then the gold answer."""
        entry = self._require_entry()
        answer = str(entry["answer"])
        if self._spec["name"] == "countdown":
            code = f"value = {answer}\nprint(value)"
        else:
            code = f"answer = {answer!r}\nprint(answer)"
        return [Action("python", code), Action("answer", answer)]

    def close(self) -> None:
        self._entry = None
        self._dataset = None

    # ------------------------------------------------------------------ scoring (public for tests)

    def score_answer(self, answer: str) -> float:
        """The task's verifier score for ``answer`` (math-verify fallback for numeric gold answers)."""
        entry = self._require_entry()
        answer = answer.strip()
        if not answer or len(answer) > MAX_ANSWER_CHARS:
            return 0.0
        numeric_gold = _is_number(str(entry["answer"]))
        if not (self._verifier_is_safe() or _is_plain_arithmetic(answer)):
            return self._score_in_sandbox(answer, numeric_gold)
        score = _safe_float(self._dataset.score_answer(answer=answer, entry=entry))
        if score >= SUCCESS_THRESHOLD or not numeric_gold:
            return score
        if _bounded_for_math_verify(answer):
            return max(score, self._math_verify(str(entry["answer"]), answer))
        return max(score, self._score_in_sandbox(answer, numeric_gold))

    # ------------------------------------------------------------------ internals

    def _require_entry(self) -> dict[str, Any]:
        if self._entry is None:
            raise RuntimeError("call reset() first")
        return self._entry

    def _observation(self, text: str) -> Observation:
        return Observation(text, self._require_entry()["question"], None)

    def _answer(self, text: str) -> StepResult:
        score = self.score_answer(text)
        won = score >= SUCCESS_THRESHOLD
        self._done = True
        info = {"tool_calls": self._tool_calls, "truncated": False, "task": self._spec["name"], "score": score,
                "gold_answer": self._require_entry()["answer"]}
        verdict = "correct" if won else "incorrect"
        return StepResult(self._observation(f"Your answer is {verdict}."), 1.0 if won else 0.0, True, won, True, info)

    def _python(self, code: str) -> tuple[str, bool, dict[str, Any]]:
        """Run a tool call; return (observation, valid, extra info)."""
        problem = _compile_problem(code)
        if problem is not None:
            return problem, False, {"tool_error": "does not compile"}
        result = run_python(code, timeout_s=self.tool_timeout_s, cpu_s=max(1, round(self.tool_timeout_s)),
                            memory_mb=self.tool_memory_mb, isolation_mode=self.sandbox_isolation)
        self._tool_calls += 1
        extra = {"tool_exit_code": result.exit_code, "tool_killed": result.killed_reason}
        return result.as_observation(max_chars=self.max_observation_chars), True, extra

    def _verifier_is_safe(self) -> bool:
        base = self._rg.dataset.ProceduralDataset.score_answer
        return self._spec["name"] in AUDITED_SAFE_VERIFIERS or type(self._dataset).score_answer is base

    def _math_verify(self, gold: str, answer: str) -> float:
        try:
            gold_parsed = self._parse(gold, parsing_timeout=None)
            answer_parsed = self._parse(answer, parsing_timeout=None)
            return 1.0 if self._verify(gold_parsed, answer_parsed, timeout_seconds=None) else 0.0
        except Exception:  # math-verify failing on odd input means "not verified"
            return 0.0

    def _score_in_sandbox(self, answer: str, numeric_gold: bool) -> float:
        spec = json.dumps({**self._spec, "answer": answer, "numeric": numeric_gold})
        result = run_python(_score_code(spec), timeout_s=30.0, cpu_s=30, memory_mb=1024,
                            isolation_mode=self.sandbox_isolation)
        try:
            return _safe_float(json.loads(result.stdout.strip().splitlines()[-1])["score"])
        except (ValueError, KeyError, IndexError, TypeError):
            _log.warning("scoring in the sandbox failed (answer scored 0): %s", result.as_observation()[-500:])
            return 0.0


_SCORE_PROGRAM = Path(__file__).with_name("math_score_child.py")
"""The scoring program run in the sandbox (its text, then ``main(<spec JSON>)``)."""


@functools.cache
def _score_source() -> str:
    return _SCORE_PROGRAM.read_text(encoding="utf-8")


def _score_code(spec: str) -> str:
    """The sandbox code that scores one answer: the scoring program, then its call with ``spec``."""
    return f"{_score_source()}\nmain({spec!r})\n"


def _compile_problem(code: str) -> str | None:
    """Why ``code`` cannot be a tool call (empty, too long, does not compile), or None."""
    if not code.strip():
        return "Invalid tool call: the code is empty."
    if len(code.encode("utf-8", "surrogatepass")) > MAX_CODE_BYTES:
        return f"Invalid tool call: the code is longer than {MAX_CODE_BYTES} bytes."
    try:
        compile(code, "<tool>", "exec", dont_inherit=True)
    except SyntaxError as err:
        return f"SyntaxError: {err.msg} (line {err.lineno})"
    except (ValueError, OverflowError, MemoryError, RecursionError) as err:
        return f"{type(err).__name__}: {err}"
    return None


def _is_plain_arithmetic(text: str) -> bool:
    """Digits and + - * / ( ) . , only, no power: harmless even for verifiers that eval the answer."""
    return bool(_PLAIN_ARITHMETIC.match(text)) and "**" not in text


def _bounded_for_math_verify(text: str) -> bool:
    """No powers, factorials, braces or LaTeX commands: math-verify's work on it is small."""
    text = _BOXED_PLAIN.sub(r"\1", text)
    return len(text) <= 500 and not any(token in text for token in ("^", "**", "!", "\\", "{", "}"))


def _is_number(text: str) -> bool:
    try:
        float(text.replace(",", ""))
    except ValueError:
        return False
    return True


def _safe_float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0
