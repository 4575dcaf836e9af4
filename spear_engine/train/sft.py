"""Cold-start supervised warm-up on the environments' own solutions (planner / gold paths).

A small model cannot follow the agent format zero-shot (SmolLM2-135M never writes ``<action>``), so RL
would see only filtered, invalid turns. As the official math SPEAR runs start from a cold-start SFT
model, ``trainer.sft_warmup_steps`` first fine-tunes on demonstrations: train-split episodes played by the
agent loop itself with a scripted engine that answers with each env's gold actions
(:class:`~spear_engine.rollout.gold.GoldPathEngine`), so prompts, turns and tokens are exactly an RL
rollout's, in either layout. The loss is the mean negative log-likelihood of the response tokens.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from spear_engine.config_loading import ConfigError
from spear_engine.data import Episode, RolloutBatch
from spear_engine.envs.base import Env
from spear_engine.rollout.agent_loop import AgentLoop, AgentLoopConfig, ChatTokens
from spear_engine.rollout.engine import SamplingParams
from spear_engine.rollout.gold import GoldPathEngine
from spear_engine.train.policy import SequenceBatch

DEMO_BLOCK = 8
"""Episodes played at once (each holds an env: a TextWorldExpress game holds a JVM)."""


def demonstrations(
    tokenizer: Any, env_factory: Callable[[], Env], env_name: str, loop_config: AgentLoopConfig, seeds: list[int]
) -> list[Episode]:
    """One gold episode per train-split seed, played by the agent loop (won or not)."""
    chat = ChatTokens(tokenizer)
    engine = GoldPathEngine(chat.encode, chat.eos_id)
    loop = AgentLoop(engine, tokenizer, env_factory, env_name, loop_config)
    params = SamplingParams(max_new_tokens=loop_config.max_response_length, temperature=0.0)
    episodes: list[Episode] = []
    try:
        for start in range(0, len(seeds), DEMO_BLOCK):
            engine.new_run()
            block = seeds[start : start + DEMO_BLOCK]
            played, _ = loop.run(block, 1, params, split="train", first_group_id=start, first_traj_id=start)
            for episode in played:
                episode.meta["demonstration"] = True
            episodes += played
    finally:
        loop.close()
    return episodes


def demonstration_rows(
    tokenizer: Any,
    env_factory: Callable[[], Env],
    env_name: str,
    loop_config: AgentLoopConfig,
    episodes: int,
    pad_token_id: int = 0,
    seed: int = 0,
) -> tuple[SequenceBatch, torch.Tensor]:
    """(rows, policy-token mask [rows, response width] as float) of the winning ones of ``episodes`` gold
    episodes: what the SFT warm-up trains on for this ``seed``."""
    seeds = [10**9 + seed * 1000 + i for i in range(episodes)]
    demos = [d for d in demonstrations(tokenizer, env_factory, env_name, loop_config, seeds) if d.success]
    if not demos:
        raise ConfigError(
            f"environment '{env_name}' produced no winning gold episode for the SFT warm-up ({episodes} tried): "
            f"its gold paths do not finish within env.max_steps, or it has none. Raise env.max_steps, or set "
            f"trainer.sft_warmup_steps=0 to train without the warm-up."
        )
    batch = RolloutBatch.from_episodes(demos, pad_token_id, layout=loop_config.layout)
    sequences = SequenceBatch.from_prompt_response(batch.prompts, batch.prompt_mask, batch.responses,
                                                   batch.response_attention_mask)  # fmt: skip
    return sequences, batch.policy_mask.float()


def sft_warmup(
    backend: Any,
    tokenizer: Any,
    env_factory: Callable[[], Env],
    env_name: str,
    loop_config: AgentLoopConfig,
    steps: int,
    episodes: int,
    rows_per_step: int,
    micro_batch: int,
    pad_token_id: int = 0,
    seed: int = 0,
    log: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, float]:
    """Fine-tune on the winning ones of ``episodes`` gold episodes for ``steps`` optimizer steps; returns the
    last metrics. ``loop_config`` is the RL agent loop's (layout, history, prompt budget, turns)."""
    sequences, mask = demonstration_rows(tokenizer, env_factory, env_name, loop_config, episodes, pad_token_id, seed)
    order = list(range(len(mask)))
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
        metrics = {"sft/nll": float(np.sum(losses)), "sft/grad_norm": norm, "sft/rows": float(len(mask))}
        if log is not None:
            log(step, metrics)
    return metrics
