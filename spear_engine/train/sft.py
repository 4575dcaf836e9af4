"""Cold-start supervised warm-up on the environments' own solutions (planner / gold paths).

A small model cannot follow the agent format zero-shot (SmolLM2-135M never writes ``<action>``), so RL
would see only filtered, invalid turns. As the official math SPEAR runs start from a cold-start SFT
model, ``trainer.sft_warmup_steps`` first fine-tunes on demonstrations: each train-split episode is
played with ``env.gold_actions()``, the prompts are built exactly as the agent loop builds them (same
prompt functions and chat tokenisation, both layouts), the responses are the gold actions in the
answer format, and the loss is the mean negative log-likelihood of the response tokens.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from spear_engine.config_loading import ConfigError
from spear_engine.data import Episode, RolloutBatch, Turn
from spear_engine.envs.base import Action, Env
from spear_engine.rollout.agent_loop import ChatTokens
from spear_engine.rollout.prompts import first_trajectory_message, next_trajectory_message, step_prompt
from spear_engine.train.policy import SequenceBatch


def render_action(action: Action) -> str:
    """A gold action in the answer format the prompts ask for."""
    if action.kind == "python":
        return f"<think>Let me compute it.</think>\n```python\n{action.text}\n```"
    if action.kind == "answer":
        return f"<think>I have the result.</think><answer>{action.text}</answer>"
    return f"<think>The next step is to {action.text}.</think><action>{action.text}</action>"


def demonstration(
    env: Env, chat: ChatTokens, env_name: str, seed: int, layout: str, history_length: int, max_prompt_length: int
) -> Episode | None:
    """One gold episode with exact tokens (None when the env offers no gold path)."""
    observation = env.reset(seed, "train")
    gold = env.gold_actions()
    if not gold:
        return None
    turns: list[Turn] = []
    history: list[tuple[str, str]] = []
    pending = chat.prompt(first_trajectory_message(env_name, observation)) if layout == "trajectory" else []
    won = False
    for k, action in enumerate(gold):
        if layout == "step":
            prompt = chat.prompt(step_prompt(env_name, observation, history, k, history_length))[-max_prompt_length:]
        else:
            prompt = pending
        text = render_action(action)
        response = [*chat.encode(text), chat.eos_id]
        result = env.step(action)
        turns.append(Turn(prompt, response, [0.0] * len(response), text, observation.text, result.action_valid,
                          int(action.kind in ("command", "python")), result.reward))  # fmt: skip
        history.append((observation.text, action.text))
        observation = result.observation
        pending = chat.next_user_turn(next_trajectory_message(observation))
        if result.done:
            won = result.won
            break
    return Episode(group_id=seed, traj_id=seed, turns=turns, success=won, meta={"demonstration": True})


def sft_warmup(
    backend: Any,
    chat: ChatTokens,
    env_factory: Callable[[], Env],
    env_name: str,
    steps: int,
    episodes: int,
    rows_per_step: int,
    micro_batch: int,
    layout: str = "step",
    history_length: int = 2,
    max_prompt_length: int = 2048,
    pad_token_id: int = 0,
    seed: int = 0,
    log: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, float]:
    """Fine-tune on ``episodes`` gold episodes for ``steps`` optimizer steps; returns the last metrics."""
    env = env_factory()
    try:
        demos = [demonstration(env, chat, env_name, 10**9 + seed * 1000 + i, layout, history_length, max_prompt_length)
                 for i in range(episodes)]  # fmt: skip
    finally:
        env.close()
    demos = [d for d in demos if d is not None and d.success]
    if not demos:
        raise ConfigError(
            f"environment '{env_name}' produced no winning gold episode for the SFT warm-up ({episodes} tried): "
            f"its gold paths do not finish within env.max_steps, or it has none. Raise env.max_steps, or set "
            f"trainer.sft_warmup_steps=0 to train without the warm-up."
        )
    batch = RolloutBatch.from_episodes(demos, pad_token_id, layout=layout)
    sequences = SequenceBatch.from_prompt_response(batch.prompts, batch.prompt_mask, batch.responses,
                                                   batch.attention_mask)  # fmt: skip
    mask = batch.policy_mask.float()
    order = list(range(len(batch)))
    rng = random.Random(seed)
    metrics: dict[str, float] = {}
    for step in range(1, steps + 1):
        rng.shuffle(order)
        rows = torch.tensor(order[:rows_per_step])
        tokens = mask[rows].sum().clamp_min(1)
        losses = []
        for start in range(0, len(rows), micro_batch):
            idx = rows[start : start + micro_batch]
            device = getattr(backend, "device", torch.device("cpu"))
            logp, _ = backend.forward(sequences.select(idx).to(device))
            loss = -(logp * mask[idx].to(device)).sum() / tokens.to(device)
            backend.backward(loss, boundary=start + micro_batch >= len(rows))
            losses.append(float(loss.detach()))
        norm, _ = backend.step()
        metrics = {"sft/nll": float(np.sum(losses)), "sft/grad_norm": norm, "sft/rows": float(len(batch))}
        if log is not None:
            log(step, metrics)
    return metrics
