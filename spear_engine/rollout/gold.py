"""A rollout engine that plays each environment's gold path (its planner / solution), so the SFT warm-up's
demonstrations come out of the agent loop itself: the same prompts, turn bookkeeping and tokens an RL
rollout has, with the gold actions as the responses."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from spear_engine.envs.base import Action, Env
from spear_engine.rollout.engine import Generation, SamplingParams

NO_GOLD_ACTION = "<think>I have no plan for this.</think>"
"""The answer once an env's gold path is used up (or it has none): no action, so the episode is not won."""


def render_action(action: Action) -> str:
    """A gold action in the answer format the prompts ask for (what ``parse_action`` reads back)."""
    if action.kind == "python":
        return f"<think>Let me compute it.</think>\n```python\n{action.text}\n```"
    if action.kind == "answer":
        return f"<think>I have the result.</think><answer>{action.text}</answer>"
    return f"<think>The next step is to {action.text}.</think><action>{action.text}</action>"


class GoldPathEngine:
    """:class:`~spear_engine.rollout.engine.RolloutEngine` answering each prompt with the next gold action of
    the env it comes from. The agent loop tells it which env each prompt belongs to
    (:meth:`prompts_from_envs`, called before every ``generate``); a gold path is read when its env is first
    seen after :meth:`new_run`, i.e. right after the reset. Responses end with ``eos_id`` and are never
    truncated: a demonstration is the whole action, whatever ``max_new_tokens`` says."""

    name = "gold"

    def __init__(self, encode: Any, eos_id: int) -> None:
        self.encode = encode
        self.eos_id = eos_id
        self._envs: list[Env] = []
        self._paths: dict[int, list[Action]] = {}
        self._turns: dict[int, int] = {}

    def new_run(self) -> None:
        """Forget the gold paths: the agent loop is about to reset its envs for a new run."""
        self._paths.clear()
        self._turns.clear()

    def prompts_from_envs(self, envs: Sequence[Env]) -> None:
        self._envs = list(envs)

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Generation]:
        if len(self._envs) != len(prompts):
            raise RuntimeError(f"the gold-path engine got {len(prompts)} prompts from {len(self._envs)} envs: the agent "
                               f"loop must call prompts_from_envs before generate")  # fmt: skip
        out = []
        for env in self._envs:
            key = id(env)
            if key not in self._paths:
                self._paths[key], self._turns[key] = list(env.gold_actions() or []), 0
            path, turn = self._paths[key], self._turns[key]
            self._turns[key] = turn + 1
            text = render_action(path[turn]) if turn < len(path) else NO_GOLD_ACTION
            tokens = [*self.encode(text), self.eos_id]
            out.append(Generation(tokens, [0.0] * len(tokens), "stop"))
        return out

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Nothing to load: the answers are scripted."""

    def close(self) -> None:
        self._envs = []
