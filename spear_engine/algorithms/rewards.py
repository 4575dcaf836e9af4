"""Step-sample scores: intrinsic tool-call bonus and the invalid-action penalty.

Each step-sample's score is ``episode reward + bonus``, written at the last valid response token of
a ``[B, T]`` float32 reward tensor (zeros elsewhere), as ``EpisodeRewardManager`` does. The bonus is
``min(cap, per_call * n) * factor(t)`` (:func:`~spear_engine.algorithms.schedules.toolcall_bonus_factor`),
the same for every step of a trajectory and independent of success. Later the invalid-action penalty
subtracts ``coef`` at the same token (and from GiGPO step returns).

Where "the last valid response token" is: the last position whose mask is non-zero. A row whose
mask is empty puts its score in the last column, as the official index ``valid_length - 1 = -1``
does, so the score still counts in ``sum(-1)`` (group statistics) though no token trains on it.

KL-in-reward (:func:`apply_kl_penalty`, ``algorithm.use_kl_in_reward``) comes after the penalty, as
verl's ``apply_kl_penalty``: ``token_level_rewards = token_level_scores - beta * KL`` per token.
Semantics in full: docs/algorithm.md, 'Rewards and the tool-call bonus'.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from spear_engine.algorithms.losses import kl_penalty as kl_estimate
from spear_engine.algorithms.schedules import toolcall_bonus_factor
from spear_engine.algorithms.token_ops import masked_mean

TOOLCALL_COUNT_RULES = ("env_steps", "tool_calls")
"""What n counts (``algorithm.toolcall_count``): ``env_steps`` = active env steps of the trajectory,
invalid ones included (official agent code, ``episode_lengths``); ``tool_calls`` = parsed, valid tool
calls / actions (paper formula; the official math code counts assistant messages with tool calls)."""

TOOLCALL_BONUS_PER_CALL = 0.1
"""Bonus per counted call (official agent and math code)."""
TOOLCALL_BONUS_CAP = 1.0
"""Cap of the raw bonus (official: min(1.0, 0.1 n), i.e. full at 10 calls)."""
INVALID_ACTION_PENALTY_COEF = 0.1
"""``actor.invalid_action_penalty_coef`` (verl-agent yaml and scripts 0.1)."""


def toolcall_counts(
    count_rule: str,
    episode_lengths: Sequence[int] | np.ndarray | None = None,
    valid_tool_calls: Sequence[int] | np.ndarray | None = None,
) -> np.ndarray:
    """n per step-sample under ``count_rule``: ``episode_lengths`` for ``env_steps``,
    ``valid_tool_calls`` for ``tool_calls`` (each a per-sample array; the one the rule needs is required)."""
    if count_rule == "env_steps":
        source, name = episode_lengths, "episode_lengths"
    elif count_rule == "tool_calls":
        source, name = valid_tool_calls, "valid_tool_calls"
    else:
        raise ValueError(
            f"Unknown tool-call count rule: {count_rule!r}; expected one of {list(TOOLCALL_COUNT_RULES)}"
        )
    if source is None:
        raise ValueError(f"count_rule={count_rule!r} needs {name}")
    return np.asarray(source)


def toolcall_bonus(
    n_calls: Sequence[int] | np.ndarray,
    step: int,
    mode: str = "none",
    max_steps: int = 100,
    per_call: float = TOOLCALL_BONUS_PER_CALL,
    cap: float = TOOLCALL_BONUS_CAP,
) -> np.ndarray:
    """Scheduled bonus per sample (float64): ``min(cap, per_call * n) * toolcall_bonus_factor(step, mode, max_steps)``.

    ``mode`` none / constant / cosine (yaml default none, SPEAR scripts cosine); ``max_steps`` = T
    (yaml 100, SPEAR scripts 200). A ``none`` bonus is exactly 0.
    """
    factor = toolcall_bonus_factor(step, mode, max_steps)
    n = np.asarray(n_calls, dtype=np.float64)
    if factor == 0.0:
        return np.zeros(n.shape, dtype=np.float64)
    return np.minimum(cap, n * per_call) * factor


def last_token_index(response_mask: torch.Tensor) -> torch.Tensor:
    """Column of each row's last valid response token (``[B]`` int64); ``T - 1`` for an empty row."""
    width = response_mask.shape[-1]
    positions = torch.arange(width, device=response_mask.device).expand_as(response_mask)
    last = torch.where(response_mask.bool(), positions, -1).amax(dim=-1)
    return torch.where(last < 0, width - 1, last)


def place_scores(
    scores: Sequence[float] | np.ndarray | torch.Tensor, response_mask: torch.Tensor
) -> torch.Tensor:
    """A ``[B, T]`` float32 tensor with ``scores[i]`` at row i's last valid token, zeros elsewhere."""
    device = response_mask.device
    if isinstance(scores, torch.Tensor):
        values = scores.detach().to(device=device, dtype=torch.float32)
    else:
        values = torch.as_tensor(np.asarray(scores, dtype=np.float64), dtype=torch.float32, device=device)
    out = torch.zeros(response_mask.shape, dtype=torch.float32, device=response_mask.device)
    rows = torch.arange(response_mask.shape[0], device=response_mask.device)
    out[rows, last_token_index(response_mask)] = values
    return out


def compute_step_scores(
    episode_rewards: Sequence[float] | np.ndarray,
    response_mask: torch.Tensor,
    step: int,
    mode: str = "none",
    max_steps: int = 100,
    count_rule: str = "env_steps",
    episode_lengths: Sequence[int] | np.ndarray | None = None,
    valid_tool_calls: Sequence[int] | np.ndarray | None = None,
    per_call: float = TOOLCALL_BONUS_PER_CALL,
    cap: float = TOOLCALL_BONUS_CAP,
) -> torch.Tensor:
    """The reward tensor of a step-sample batch: ``episode_rewards + bonus`` placed at
    the last valid token of the (unfiltered, attention-derived) ``response_mask``."""
    rewards = np.asarray(episode_rewards, dtype=np.float64)
    if toolcall_bonus_factor(step, mode, max_steps) == 0.0:  # also validates mode
        return place_scores(rewards, response_mask)
    n = toolcall_counts(count_rule, episode_lengths, valid_tool_calls)
    return place_scores(rewards + toolcall_bonus(n, step, mode, max_steps, per_call, cap), response_mask)


def apply_invalid_action_penalty(
    token_level_scores: torch.Tensor,
    response_mask: torch.Tensor,
    is_action_valid: Sequence[bool] | np.ndarray | torch.Tensor,
    invalid_action_penalty_coef: float = INVALID_ACTION_PENALTY_COEF,
    step_rewards: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, float]]:
    """Subtract ``coef`` from the score of every step-sample whose action is invalid.

    The penalty goes to the same token as the score - the row's last valid token of
    ``response_mask``, which must be the *unfiltered* attention-derived mask the scores were placed
    with (the official code uses the attention mask; a Dr.BoT-zeroed row would otherwise move the
    penalty to the last column) - and, for GiGPO, to ``step_rewards[i]``. Returns new tensors (inputs are not
    modified) and the metric ``valid_action_ratio``.
    """
    if isinstance(is_action_valid, torch.Tensor):
        is_action_valid = is_action_valid.detach().cpu().numpy()
    valid = np.asarray(is_action_valid, dtype=np.float32)
    invalid = torch.as_tensor(1.0 - valid, dtype=torch.float32, device=token_level_scores.device)
    penalty = invalid_action_penalty_coef * invalid
    scores = token_level_scores.clone()
    rows = torch.arange(scores.shape[0], device=scores.device)
    scores[rows, last_token_index(response_mask)] -= penalty.to(scores.dtype)
    new_step_rewards = None if step_rewards is None else step_rewards - penalty.to(step_rewards.dtype)
    metrics = {"valid_action_ratio": float(np.mean(valid)) if valid.size else float("nan")}
    return scores, new_step_rewards, metrics


def apply_kl_penalty(
    token_level_scores: torch.Tensor,
    old_log_prob: torch.Tensor,
    ref_log_prob: torch.Tensor,
    response_mask: torch.Tensor,
    kl_coef: float,
    kl_penalty: str = "kl",
) -> tuple[torch.Tensor, dict[str, float]]:
    """KL-in-reward, as verl's ``ray_trainer.apply_kl_penalty`` with the fixed KL controller.

    ``kld = kl_penalty(old_log_prob, ref_log_prob) * response_mask`` per token (the estimator kinds of
    :func:`~spear_engine.algorithms.losses.kl_penalty`: kl/k1, abs, mse/k2, low_var_kl/k3) and
    ``token_level_rewards = token_level_scores - kl_coef * kld``. ``response_mask`` is the unfiltered
    mask of sampled tokens (verl-agent: the response attention mask, or ``loss_mask`` multi-turn).
    Metrics: ``actor/reward_kl_penalty`` = the batch mean of each row's masked-mean KL (an empty row
    counts 0, as verl's ``masked_mean``) and ``actor/reward_kl_penalty_coeff`` = ``kl_coef``.
    Only verl's default ``kl_ctrl.type: fixed`` is implemented (beta never changes); inputs are not modified.
    """
    mask = response_mask.to(token_level_scores.dtype)
    kld = kl_estimate(old_log_prob.detach(), ref_log_prob.detach(), kl_penalty).to(mask.dtype) * mask
    rewards = token_level_scores - kl_coef * kld
    per_row = masked_mean(kld, mask, axis=-1)
    current_kl = float(per_row.mean()) if per_row.numel() else 0.0
    return rewards, {"actor/reward_kl_penalty": current_kl, "actor/reward_kl_penalty_coeff": float(kl_coef)}
