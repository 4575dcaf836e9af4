"""The multi-turn agent loop: many environments at once, exact token bookkeeping, two sample layouts.

Per turn, every active environment's prompt is built, all prompts go to the rollout engine in one
``generate`` call, each response is parsed into an action and the environments step (in a thread
pool). The training tokens are exactly the engine's sampled ids: responses are decoded only to be
parsed and filtered, never re-tokenised.

* ``step`` layout (official verl-agent): each env step is one sample; its prompt is a fresh
  single-turn chat holding the task, the last ``history_length`` steps and the observation.
* ``trajectory`` layout: one conversation per episode. The first turn's prompt is the chat template
  of the first user message; every later turn's ``prompt_ids`` are only the tokens added since the
  previous response: an end-of-turn token if the response was cut at the length limit, then the
  template's rendering of the next user message. Concatenating ``prompt_ids + response_ids`` over the
  turns gives the whole conversation; only the response tokens are policy tokens.

Environment faults (README: Faults): every ``reset`` / ``step`` runs on a daemon thread with a deadline
(``step_timeout_s``). A call that raises, hangs past the deadline, or returns something malformed (not a
``StepResult`` / ``Observation``, a non-finite reward, a flag that is not a bool) ends its episode as
failed (``meta["end"]`` = ``"env_error"`` or ``"env_timeout"``, the reason in ``meta["error"]``); the rest
of the batch goes on. The broken env is closed and replaced by a fresh one from the factory before its
next use. Counts per ``run``: ``rollout/env_errors``, ``rollout/env_timeouts``, ``rollout/env_restarts``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

from spear_engine.data import Episode, Turn
from spear_engine.envs.base import Action, Env, Observation, StepResult
from spear_engine.rollout.engine import Generation, RolloutEngine, SamplingParams
from spear_engine.rollout.env_guard import (
    CallOutcome,
    close_quietly,
    observation_problem,
    run_with_deadline,
    step_result_problem,
)
from spear_engine.rollout.parsing import parse_action
from spear_engine.rollout.prompts import first_trajectory_message, next_trajectory_message, step_prompt

_log = logging.getLogger(__name__)
FAULT_COUNTERS = ("rollout/env_errors", "rollout/env_timeouts", "rollout/env_restarts")


@dataclass(frozen=True)
class AgentLoopConfig:
    layout: Literal["step", "trajectory"] = "step"
    history_length: int = 2
    max_turns: int = 50
    max_prompt_length: int = 2048
    """step layout: prompts longer than this keep their last tokens. trajectory layout: the episode ends
    (truncated) when the conversation would grow past this many tokens before a turn."""
    max_response_length: int = 512
    env_workers: int = 8
    step_timeout_s: float | None = 60.0
    """Seconds one env ``reset`` or ``step`` may take (None: no limit). A call past it ends its episode as
    failed (``env_timeout``); its thread is abandoned and the env replaced before its next use."""


@dataclass
class _Slot:
    """One running episode."""

    env: Env | None
    env_index: int
    group_id: int
    traj_id: int
    seed: int
    observation: Observation | None = None
    turns: list[Turn] = field(default_factory=list)
    history: list[tuple[str, str]] = field(default_factory=list)
    conversation: list[int] = field(default_factory=list)
    pending_prompt: list[int] = field(default_factory=list)
    done: bool = False
    won: bool = False
    meta: dict[str, Any] = field(default_factory=dict)


class ChatTokens:
    """Chat-template tokenisation with the pieces the trajectory layout needs."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("the tokenizer has no chat template; the agent loop needs one")
        self.eos_id = int(tokenizer.eos_token_id)
        self._delta_prefix = self._render([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}])
        eos_text = tokenizer.eos_token
        cut = self._delta_prefix.rfind(eos_text)
        if cut < 0:
            raise ValueError("the chat template does not end an assistant turn with the eos token")
        self._after_eos = cut + len(eos_text)

    def _render(self, messages: list[dict[str, str]], generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt(self, content: str) -> list[int]:
        """A single-turn chat ending with the assistant generation prompt."""
        return self.encode(self._render([{"role": "user", "content": content}], generation_prompt=True))

    def next_user_turn(self, content: str) -> list[int]:
        """The tokens that follow an assistant turn's eos: the rest of its ending plus a new user turn and
        the generation prompt (what the template would render there)."""
        messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
        full = self._render([*messages, {"role": "user", "content": content}], generation_prompt=True)
        if not full.startswith(self._delta_prefix):
            raise ValueError("the chat template renders earlier turns differently once a turn is added")
        return self.encode(full[self._after_eos :])

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)


class AgentLoop:
    """Runs groups of episodes with one rollout engine; see the module docstring."""

    def __init__(
        self,
        engine: RolloutEngine,
        tokenizer: Any,
        env_factory: Callable[[], Env],
        env_name: str,
        config: AgentLoopConfig = AgentLoopConfig(),
    ) -> None:
        self.engine = engine
        self.chat = ChatTokens(tokenizer)
        self.env_factory = env_factory
        self.env_name = env_name
        self.config = config
        self._envs: list[Env | None] = []
        """Env i serves slot i of every ``run``; None marks a broken env, replaced before its next use."""

    def close(self) -> None:
        for env in self._envs:
            if env is not None:
                try:
                    env.close()
                except Exception as err:  # closing must not hide the envs after it
                    _log.warning("closing an environment failed: %r", err)
        self._envs.clear()

    def release_envs(self, keep: int) -> int:
        """Close the pooled envs of slots ``keep`` onwards (an evaluation wider than a training step leaves them
        idle; each TextWorldExpress game holds a JVM of ~80 MB); returns how many were closed."""
        extra, self._envs = self._envs[keep:], self._envs[:keep]
        for env in extra:
            if env is not None:
                close_quietly(env)
        return sum(env is not None for env in extra)

    def _env(self, i: int, counters: dict[str, float]) -> Env:
        """Env ``i``; a broken one is replaced by a fresh one from the factory (counted as a restart)."""
        while len(self._envs) <= i:
            self._envs.append(self.env_factory())
        env = self._envs[i]
        if env is None:
            env = self._envs[i] = self.env_factory()
            counters["rollout/env_restarts"] += 1
        return env

    def _retire_env(self, i: int) -> None:
        """Env ``i`` failed: close it in the background (it may be hung) and replace it before its next use."""
        env, self._envs[i] = self._envs[i], None
        if env is not None:
            close_quietly(env)

    # -------------------------------------------------------------------------------------------
    def run(
        self,
        seeds: Sequence[int],
        group_size: int,
        params: SamplingParams,
        split: str = "train",
        first_group_id: int = 0,
        first_traj_id: int = 0,
    ) -> tuple[list[Episode], dict[str, float]]:
        """``group_size`` episodes per seed (one prompt group per seed); returns episodes and timings."""
        timing = {"time/generate": 0.0, "time/env": 0.0, "rollout/generated_tokens": 0.0, "rollout/env_steps": 0.0,
                  **dict.fromkeys(FAULT_COUNTERS, 0.0)}  # fmt: skip
        slots = []
        for g, seed in enumerate(seeds):
            for k in range(group_size):
                i = g * group_size + k
                slot = _Slot(None, i, first_group_id + g, first_traj_id + i, seed)
                try:
                    slot.env = self._env(i, timing)
                except Exception as err:
                    if i >= len(self._envs):  # the first env of this slot cannot be built: a setup error
                        raise
                    self._fail(slot, f"restart: {err!r}", "env_error", timing)
                slots.append(slot)
        start = time.perf_counter()
        self._reset_all([s for s in slots if not s.done], split, timing)
        timing["time/env"] += time.perf_counter() - start
        response_params = SamplingParams(
            max_new_tokens=min(params.max_new_tokens, self.config.max_response_length),
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            stop_token_ids=tuple(params.stop_token_ids) or (self.chat.eos_id,),
            seed=params.seed,
        )
        for turn in range(self.config.max_turns):
            active = [s for s in slots if not s.done]
            if not active:
                break
            prompts = [self._prompt(s, turn) for s in active]
            still = [(s, p) for s, p in zip(active, prompts) if p is not None]
            if not still:
                break
            t0 = time.perf_counter()
            turn_params = response_params
            if params.seed is not None:
                turn_params = SamplingParams(**{**response_params.__dict__, "seed": params.seed + 7919 * turn})
            scripted = getattr(self.engine, "prompts_from_envs", None)  # an engine that answers from the env itself
            if scripted is not None:
                scripted([s.env for s, _ in still])
            generations = self.engine.generate([p for _, p in still], turn_params)
            if len(generations) != len(still):
                raise RuntimeError(f"rollout engine {self.engine.name!r} returned {len(generations)} generations "
                                   f"for {len(still)} prompts")  # fmt: skip
            t1 = time.perf_counter()
            self._step_all(still, generations, timing)
            timing["time/generate"] += t1 - t0
            timing["time/env"] += time.perf_counter() - t1
            timing["rollout/generated_tokens"] += sum(len(g.token_ids) for g in generations)
            timing["rollout/env_steps"] += len(still)
        for s in slots:
            if not s.done:
                s.meta.setdefault("end", "max_turns")
        episodes = [
            Episode(s.group_id, s.traj_id, s.turns, s.won, {"seed": s.seed, "layout": self.config.layout, **s.meta})
            for s in slots
        ]
        return episodes, timing

    def _guarded(self, calls: list[Callable[[], Any]]) -> list[CallOutcome]:
        return run_with_deadline(calls, self.config.env_workers, self.config.step_timeout_s)

    def _fail(self, slot: _Slot, reason: str, end: str, counters: dict[str, float]) -> None:
        """An env fault: the episode ends as failed with its reason, the env is replaced, the fault counted."""
        slot.done, slot.meta["end"], slot.meta["error"] = True, end, reason
        counters["rollout/env_timeouts" if end == "env_timeout" else "rollout/env_errors"] += 1
        if slot.env is not None:
            self._retire_env(slot.env_index)

    def _fault(self, slot: _Slot, what: str, outcome: CallOutcome, problem: str | None,
               counters: dict[str, float]) -> bool:  # fmt: skip
        """Record the fault of a guarded call, if it had one; returns whether it had."""
        if outcome.timed_out:
            self._fail(slot, f"{what}: no answer within {self.config.step_timeout_s} s", "env_timeout", counters)
        elif outcome.error is not None:
            self._fail(slot, f"{what}: {outcome.error!r}", "env_error", counters)
        elif problem is not None:
            self._fail(slot, f"{what}: malformed result: {problem}", "env_error", counters)
        else:
            return False
        return True

    # -------------------------------------------------------------------------------------------
    def _reset_all(self, slots: list[_Slot], split: str, counters: dict[str, float]) -> None:
        outcomes = self._guarded([partial(s.env.reset, s.seed, split) for s in slots])  # type: ignore[union-attr]
        for slot, outcome in zip(slots, outcomes):
            problem = observation_problem(outcome.value) if outcome.ok else None
            if self._fault(slot, "reset", outcome, problem, counters):
                continue
            slot.observation = outcome.value
            if self.config.layout == "trajectory":
                slot.pending_prompt = self.chat.prompt(first_trajectory_message(self.env_name, slot.observation))

    def _prompt(self, slot: _Slot, turn: int) -> list[int] | None:
        """The token ids the policy sees for this turn (None ends a trajectory that outgrew its budget)."""
        assert slot.observation is not None
        if self.config.layout == "step":
            text = step_prompt(self.env_name, slot.observation, slot.history, turn, self.config.history_length)
            ids = self.chat.prompt(text)
            if len(ids) > self.config.max_prompt_length:
                slot.meta["prompt_truncated"] = slot.meta.get("prompt_truncated", 0) + 1
                ids = ids[-self.config.max_prompt_length :]
            return ids
        context = slot.conversation + slot.pending_prompt
        if len(context) > self.config.max_prompt_length:
            slot.done, slot.meta["end"] = True, "context_limit"
            return None
        return context

    def _step_all(self, items: list[tuple[_Slot, list[int]]], generations: list[Generation],
                  counters: dict[str, float]) -> None:  # fmt: skip
        """Parse every response into an action, step the envs (guarded), record the turns."""
        texts = [self.chat.decode(g.token_ids) for g in generations]
        actions = [parse_action(t.removesuffix(self.chat.tokenizer.eos_token)) for t in texts]
        outcomes = self._guarded([partial(s.env.step, a) for (s, _), a in zip(items, actions)])  # type: ignore[union-attr]
        for (slot, prompt), generation, text, action, outcome in zip(items, generations, texts, actions, outcomes):
            problem = step_result_problem(outcome.value) if outcome.ok else None
            result = outcome.value
            if self._fault(slot, "step", outcome, problem, counters):  # the episode ends as failed, the batch goes on
                result = StepResult(Observation("", ""), 0.0, True, False, False, {"error": slot.meta["error"]})
            self._record(slot, prompt, generation, text, action, result)

    def _record(self, slot: _Slot, prompt: list[int], generation: Generation, text: str, action: Action,
                result: StepResult) -> None:  # fmt: skip
        observation_before = slot.observation
        new_tokens = prompt if self.config.layout == "step" else slot.pending_prompt
        tool_calls = int(result.action_valid and action.kind in ("command", "python"))
        slot.turns.append(
            Turn(
                prompt_ids=list(new_tokens),
                response_ids=list(generation.token_ids),
                rollout_log_probs=[float(x) for x in generation.logprobs],
                response_text=text,
                observation=observation_before.text if observation_before else "",
                action_valid=bool(result.action_valid),
                tool_calls=tool_calls,
                reward=float(result.reward),
            )
        )
        slot.history.append((observation_before.text if observation_before else "", action.text))
        slot.observation = result.observation
        if self.config.layout == "trajectory":
            slot.conversation += slot.pending_prompt + list(generation.token_ids)
            closing = [] if generation.token_ids[-1:] == [self.chat.eos_id] else [self.chat.eos_id]
            slot.pending_prompt = closing + self.chat.next_user_turn(next_trajectory_message(result.observation))
        if result.done:
            slot.done, slot.won = True, bool(result.won)
            slot.meta.setdefault("end", "won" if result.won else "done")
