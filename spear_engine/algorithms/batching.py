"""Batch-size padding by duplication: verl-agent's ``adjust_batch(mode="copy")`` (docs/algorithm.md).

The official trainer, right after the rollout (before rewards, filters and advantages), appends copies
of randomly chosen step-samples until the batch size is a multiple of
``lcm(ref log-prob micro x W, rollout log-prob micro x W, ppo_mini_batch_size)`` (W = number of GPUs).
The copies keep their ``uid`` / ``traj_uid``, so they take part in every group statistic (GRPO / GiGPO
means and stds, the rollout std-filter, replay admission and baseline) and in the loss.
"""

from __future__ import annotations

import math

import numpy as np


def pad_size_divisor(micro_batch_size: int, mini_batch_size: int, world_size: int = 1) -> int:
    """``lcm(micro x W, micro x W, mini)`` of ``adjust_batch``; the engine computes the reference and the
    old log-probs with the actor micro-batch size, so the two log-prob divisors are equal."""
    if micro_batch_size < 1 or mini_batch_size < 1 or world_size < 1:
        raise ValueError(
            f"sizes must be >= 1 (micro {micro_batch_size}, mini {mini_batch_size}, world {world_size})"
        )
    return math.lcm(micro_batch_size * world_size, mini_batch_size)


def duplication_indices(batch_size: int, size_divisor: int, rng: np.random.Generator) -> np.ndarray:
    """Row indices to append so that ``batch_size + len(result)`` is a multiple of ``size_divisor``.

    As the official ``np.random.choice(bs, size_divisor - remainder, replace=False)``: distinct rows drawn
    uniformly, here from the seeded ``rng``. The official draw fails when more copies are needed than the
    batch has rows (a small batch against a large mini-batch); then every row is copied once per whole
    round (each round a fresh permutation) and the last round is a draw without replacement.
    Empty when the size already divides (or the batch is empty).
    """
    if size_divisor < 1:
        raise ValueError(f"size_divisor must be >= 1, got {size_divisor}")
    remainder = batch_size % size_divisor
    if batch_size == 0 or remainder == 0:
        return np.zeros(0, dtype=np.int64)
    to_add = size_divisor - remainder
    rounds, rest = divmod(to_add, batch_size)
    parts = [rng.permutation(batch_size) for _ in range(rounds)]
    parts.append(rng.choice(batch_size, rest, replace=False))
    return np.concatenate(parts).astype(np.int64)
