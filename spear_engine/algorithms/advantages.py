"""Advantage estimators (registry by name): GRPO as verl 0.9, GiGPO as the official SPEAR code.

Inputs follow verl: ``token_level_rewards``/``response_mask`` are ``[B, T]``; ``index`` (the prompt
group, ``uid``), ``traj_index`` (``traj_uid``) and ``anchor_obs`` are numpy arrays (or sequences) of
any hashable ids, strings included. Every estimator returns ``(advantages, returns)``, both
``[B, T]`` and already multiplied by the mask (docs/algorithm.md, 'Advantages').
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Sequence
from enum import Enum
from typing import Any

import numpy as np
import torch

ADV_ESTIMATOR_REGISTRY: dict[str, Callable[..., Any]] = {}
"""Registered advantage estimators by name: grpo, gigpo."""


def register_adv_est(name_or_enum: str | Enum) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: register an estimator; registering a different function under a taken name fails."""
    name = name_or_enum.value if isinstance(name_or_enum, Enum) else name_or_enum

    def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in ADV_ESTIMATOR_REGISTRY and ADV_ESTIMATOR_REGISTRY[name] is not fn:
            raise ValueError(
                f"advantage estimator {name!r} is already registered: {ADV_ESTIMATOR_REGISTRY[name]}"
            )
        ADV_ESTIMATOR_REGISTRY[name] = fn
        return fn

    return decorator


def get_adv_estimator_fn(name_or_enum: str | Enum) -> Callable[..., Any]:
    """The estimator registered as ``name_or_enum``; ValueError listing the registered names otherwise."""
    name = name_or_enum.value if isinstance(name_or_enum, Enum) else name_or_enum
    if name not in ADV_ESTIMATOR_REGISTRY:
        raise ValueError(f"Unknown advantage estimator: {name!r}. Registered: {list(ADV_ESTIMATOR_REGISTRY)}")
    return ADV_ESTIMATOR_REGISTRY[name]


# --------------------------------------------------------------------------------------------
# group statistics
# --------------------------------------------------------------------------------------------
def _as_ids(ids: Sequence[Hashable] | np.ndarray | torch.Tensor) -> Sequence[Hashable]:
    """Ids as an indexable sequence of hashables (0-d tensors would hash by identity)."""
    return ids.tolist() if isinstance(ids, torch.Tensor) else ids


def _groups(ids: Sequence[Hashable] | np.ndarray) -> dict[Hashable, list[int]]:
    """Row positions per id, ids in first-seen order."""
    groups: dict[Hashable, list[int]] = {}
    for row, key in enumerate(_as_ids(ids)):
        groups.setdefault(key, []).append(row)
    return groups


def _normalise_by_group(
    scores: torch.Tensor,
    groups: Iterable[list[int]],
    members: dict[int, list[int]] | None,
    singleton: str,
    epsilon: float,
    divide_by_std: bool,
) -> torch.Tensor:
    """``(s - mean_g)`` or ``(s - mean_g) / (std_g + eps)`` per row (unbiased std, torch.std).

    ``members`` optionally narrows which rows of a group enter its statistics (default: all).
    ``singleton`` says what a one-member group uses: ``"zero_mean"`` (mean 0, std 1: GRPO and the
    GiGPO episode level) or ``"self_mean"`` (mean = the value, std 1: the GiGPO step level).
    """
    mean = torch.zeros_like(scores)
    std = torch.ones_like(scores)
    for group_index, rows in enumerate(groups):
        stat_rows = rows if members is None else members[group_index]
        values = scores[stat_rows]
        if len(stat_rows) > 1:
            mean[rows] = torch.mean(values)
            std[rows] = torch.std(values)
        elif singleton == "self_mean":
            mean[rows] = values[0]
    centred = scores - mean
    return centred / (std + epsilon) if divide_by_std else centred


# --------------------------------------------------------------------------------------------
# GRPO
# --------------------------------------------------------------------------------------------
@register_adv_est("grpo")
def compute_grpo_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: np.ndarray,
    epsilon: float = 1e-6,
    norm_adv_by_std_in_grpo: bool = True,
    config: Any = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO outcome advantage (verl 0.9), normalised over every row of a prompt group.

    ``s_i = sum_t r_it``; the group is every row sharing ``index[i]``. ``A_i = s_i - mean`` or
    ``(s_i - mean) / (std + epsilon)`` (unbiased std) when ``norm_adv_by_std_in_grpo`` (False =
    Dr.GRPO / Dr.BoT). A group of one uses mean 0 and std 1. Returns ``(A * mask, A * mask)``.

    The official verl-agent version also takes ``traj_index`` but groups over all step-samples of a
    uid (``compute_mean_std_cross_all_data=True``), which is what this computes. ``config`` (verl's
    AlgoConfig) is accepted and unused.
    """
    del config
    with torch.no_grad():
        scores = token_level_rewards.sum(dim=-1)
        groups = list(_groups(index).values())
        adv = _normalise_by_group(scores, groups, None, "zero_mean", epsilon, norm_adv_by_std_in_grpo)
        adv = adv.unsqueeze(-1) * response_mask
    return adv, adv


# --------------------------------------------------------------------------------------------
# GiGPO (A:gigpo/core_gigpo.py)
# --------------------------------------------------------------------------------------------
GIGPO_MODES = ("mean_norm", "mean_std_norm")
"""``algorithm.gigpo.mode``: drop the std (yaml default) or divide by std + eps (every script)."""


def to_hashable(x: Any) -> Hashable:
    """A hashable key for an anchor observation: scalars as they are, arrays/lists/tuples as tuples,
    dicts as sorted (key, value) tuples; anything else raises TypeError (as the official code)."""
    if isinstance(x, (bool, int, float, str)):
        return x
    if isinstance(x, (np.integer, np.floating, np.bool_)):
        return x.item()
    if isinstance(x, np.ndarray):
        return tuple(x.flatten().tolist())
    if isinstance(x, (list, tuple)):
        return tuple(to_hashable(e) for e in x)
    if isinstance(x, dict):
        return tuple(sorted((k, to_hashable(v)) for k, v in x.items()))
    raise TypeError(f"Unsupported anchor observation type: {type(x)}")


def compute_step_discounted_returns(
    rewards: Sequence[float] | np.ndarray,
    traj_uid: Sequence[Hashable] | np.ndarray,
    gamma: float,
    active_masks: Sequence[bool] | np.ndarray | None = None,
) -> torch.Tensor:
    """Discounted return of every step-sample within its trajectory (GiGPO step level): float32 ``[B]``.

    ``G_t = sum_{j >= t} gamma^{j-t} r_j`` over the rows of the same ``traj_uid`` in batch order
    (the official code takes them from ``batch.non_tensor_batch['rewards'/'traj_uid'/'active_masks']``).
    Rewards are the env rewards only (no tool bonus). As the official code with numpy 1.x, the
    recursion runs in float64 on float32-rounded rewards and the result is float32.
    ``active_masks`` (optional) must be all true: only active steps are step-samples.
    """
    r = np.asarray(rewards, dtype=np.float32).astype(np.float64)
    if active_masks is not None and not np.asarray(active_masks, dtype=bool).all():
        raise ValueError("active_masks must be all true: inactive env steps are not step-samples")
    returns = np.zeros(len(r), dtype=np.float64)
    for rows in _groups(traj_uid).values():
        running = 0.0
        for row in reversed(rows):
            running = r[row] + gamma * running
            returns[row] = running
    return torch.from_numpy(returns.astype(np.float32))


def build_step_group(
    anchor_obs: Sequence[Any] | np.ndarray, index: Sequence[Hashable] | np.ndarray
) -> np.ndarray:
    """Anchor-state step groups: within each ``index`` group, rows whose anchor observations are
    equal (after :func:`to_hashable`) share a step-group id.

    Returns int64 ids ``0..K-1`` numbered in order of first appearance. The official code draws a
    uuid4 string per group; only equality of ids matters, so deterministic integers replace them.
    """
    if len(anchor_obs) != len(index):
        raise ValueError(f"anchor_obs ({len(anchor_obs)}) and index ({len(index)}) differ in length")
    ids: dict[tuple[Hashable, Hashable], int] = {}
    out = np.empty(len(index), dtype=np.int64)
    for row, (group, obs) in enumerate(zip(_as_ids(index), anchor_obs)):
        out[row] = ids.setdefault((group, to_hashable(obs)), len(ids))
    return out


def episode_norm_reward(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: np.ndarray,
    traj_index: np.ndarray,
    epsilon: float = 1e-6,
    remove_std: bool = True,
    compute_mean_std_cross_all_data: bool = True,
) -> torch.Tensor:
    """GiGPO episode-level advantage ``[B, T]`` (masked).

    Statistics per ``index`` group over all its step-samples (``compute_mean_std_cross_all_data``,
    the official default) or over the first step-sample of each trajectory (False). A group with
    one contributing value uses mean 0, std 1. ``remove_std``: ``s - mean``; else ``/ (std + eps)``.
    """
    with torch.no_grad():
        scores = token_level_rewards.sum(dim=-1)
        groups = list(_groups(index).values())
        members = None
        if not compute_mean_std_cross_all_data:
            traj_ids = _as_ids(traj_index)
            members = {}
            for group_index, rows in enumerate(groups):
                first_of_traj: dict[Hashable, int] = {}
                for row in rows:
                    first_of_traj.setdefault(traj_ids[row], row)
                members[group_index] = list(first_of_traj.values())
        adv = _normalise_by_group(scores, groups, members, "zero_mean", epsilon, not remove_std)
        return adv.unsqueeze(-1) * response_mask


def step_norm_reward(
    step_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: np.ndarray,
    epsilon: float = 1e-6,
    remove_std: bool = True,
) -> torch.Tensor:
    """GiGPO step-level advantage ``[B, T]`` (masked): ``index`` are step-group ids.

    A step group of one has mean = its own return and std 1, so its step advantage is 0.
    """
    with torch.no_grad():
        groups = list(_groups(index).values())
        adv = _normalise_by_group(step_rewards.clone(), groups, None, "self_mean", epsilon, not remove_std)
        return adv.unsqueeze(-1) * response_mask


@register_adv_est("gigpo")
def compute_gigpo_outcome_advantage(
    token_level_rewards: torch.Tensor,
    step_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    anchor_obs: np.ndarray,
    index: np.ndarray,
    traj_index: np.ndarray,
    epsilon: float = 1e-6,
    step_advantage_w: float = 1.0,
    mode: str = "mean_norm",
) -> tuple[torch.Tensor, torch.Tensor]:
    """GiGPO: ``A = A_episode + step_advantage_w * A_step``, both masked.

    ``token_level_rewards`` feed the episode level (GRPO-like over the uid, including the tool bonus
    and the invalid penalty); ``step_rewards`` (``[B]``, discounted env returns minus the invalid
    penalty) feed the step level over anchor-state groups. ``mode`` (``mean_norm`` |
    ``mean_std_norm``) applies to both levels and ignores ``norm_adv_by_std_in_grpo``.
    """
    if mode not in GIGPO_MODES:
        raise ValueError(f"Unknown GiGPO mode: {mode!r}; expected one of {list(GIGPO_MODES)}")
    remove_std = mode == "mean_norm"
    episode = episode_norm_reward(token_level_rewards, response_mask, index, traj_index, epsilon, remove_std)
    step_groups = build_step_group(anchor_obs, index)
    step = step_norm_reward(step_rewards, response_mask, step_groups, epsilon, remove_std)
    scores = episode + step_advantage_w * step
    return scores, scores
