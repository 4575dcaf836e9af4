"""The few cross-rank reductions the trainer needs, each a no-op in one process."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def sum_over_ranks(totals: np.ndarray, world_size: int) -> np.ndarray:
    """Element-wise sum of every rank's ``totals``."""
    if world_size == 1:
        return totals
    summed = torch.from_numpy(totals.copy())
    torch.distributed.all_reduce(summed)
    return summed.numpy()


def max_over_ranks(value: float, world_size: int) -> float:
    if world_size == 1:
        return value
    most = torch.tensor([value])
    torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX)
    return float(most.item())


def all_ranks(flag: bool, world_size: int) -> bool:
    """Whether ``flag`` holds on every rank."""
    if world_size == 1:
        return flag
    least = torch.tensor([float(flag)])
    torch.distributed.all_reduce(least, op=torch.distributed.ReduceOp.MIN)
    return bool(least.item() > 0)


def gather_objects(mine: Any, world_size: int) -> list[Any]:
    """Every rank's ``mine``, in rank order."""
    if world_size == 1:
        return [mine]
    everyone: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(everyone, mine)
    return everyone
