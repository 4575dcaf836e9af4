"""Shared helpers for the text-game env tests (ALFWorld, TextWorldExpress)."""

from __future__ import annotations

import random

from spear_engine.envs.base import Action, Env, StepResult


def play(env: Env, actions: list[Action]) -> list[StepResult]:
    """Every step's result of playing ``actions`` from the current state."""
    return [env.step(a) for a in actions]


def random_policy_wins(env: Env, seeds: range, rng: random.Random, max_steps: int = 30) -> int:
    """How many of the ``seeds`` (train split) a uniformly random admissible command wins within
    ``max_steps`` steps."""
    wins = 0
    for seed in seeds:
        obs = env.reset(seed, "train")
        for _ in range(max_steps):
            r = env.step(Action("command", rng.choice(obs.admissible_actions)))
            obs = r.observation
            if r.done:
                break
        wins += r.won
    return wins
