"""The config-driven stages between a rollout batch and the policy update (DESIGN.md data flow).

Each function reads the config, calls the pure algorithm functions and returns plain data plus the
metrics of its stage. The trainer (and ``spear demo``) calls them in order; no stage reaches back
into another.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from spear_engine.algorithms.advantages import (
    compute_gigpo_outcome_advantage,
    compute_grpo_outcome_advantage,
    compute_step_discounted_returns,
    episode_norm_reward,
)
from spear_engine.algorithms.filters import (
    apply_response_filters,
    compute_response_flags,
    filter_rollout_by_group_std,
)
from spear_engine.algorithms.rewards import apply_invalid_action_penalty, compute_step_scores
from spear_engine.algorithms.schedules import replay_coefficient, toolcall_bonus_factor
from spear_engine.algorithms.self_imitation import MASK_ATTENTION, MASK_RESPONSE, SILBatch
from spear_engine.config import SpearConfig
from spear_engine.data import RolloutBatch


@dataclass
class ScoredBatch:
    """A rollout batch after rewards and filters: what the advantage and update stages need."""

    batch: RolloutBatch
    token_level_scores: torch.Tensor
    """[B, L] episode reward + tool bonus at the last response token (before the invalid penalty)."""
    response_mask: torch.Tensor
    """[B, L] the policy-token mask with Dr.BoT-flagged rows zeroed (when the filters apply)."""


def schedule_metrics(config: SpearConfig, step: int) -> dict[str, float]:
    """c(t) and the tool-bonus factor of step t (logged every step)."""
    algo, replay = config.algorithm, config.replay
    return {
        "schedule/replay_coef": replay_coefficient(step, replay.replay_loss_coef, replay.max_replay_loss_steps)
        if replay.enable_trajectory_replay
        else 0.0,
        "schedule/toolcall_bonus_factor": toolcall_bonus_factor(step, algo.use_toolcall_reward, algo.max_toolcall_steps),
    }


def score_and_filter(config: SpearConfig, batch: RolloutBatch, step: int) -> tuple[ScoredBatch, dict[str, float]]:
    """Rewards with the tool-call bonus (spec 4), then the Dr.BoT response filters (spec 5.1)."""
    algo = config.algorithm
    policy_mask = batch.policy_mask.float()
    scores = compute_step_scores(
        batch.episode_rewards,
        policy_mask,
        step,
        mode=algo.use_toolcall_reward,
        max_steps=algo.max_toolcall_steps,
        count_rule=algo.toolcall_count,
        episode_lengths=batch.episode_lengths,
        valid_tool_calls=batch.episode_tool_calls,
        per_call=algo.toolcall_bonus_per_call,
        cap=algo.toolcall_bonus_cap,
    )
    filters_apply = config.replay.enable_trajectory_replay or algo.filters_without_replay
    metrics: dict[str, float] = {}
    response_mask = policy_mask
    if filters_apply:
        flags = compute_response_flags(
            batch.policy_token_ids(),
            batch.response_texts,
            max_response_len=config.data.max_response_length,
            ngram_n=algo.repetition_ngram,
            ngram_threshold=algo.repetition_min_count,
        )
        enabled = {
            "is_incomplete": algo.filter_incomplete_responses,
            "is_overlong": algo.filter_overlong_responses,
            "is_repetitive": algo.filter_repetitive_responses,
            "is_unreadable": algo.filter_unreadable_responses,
        }
        response_mask, counts = apply_response_filters(
            policy_mask, **{k: flags[k] if on else None for k, on in enabled.items()}
        )
        metrics.update({k: float(v) for k, v in counts.items()})
    return ScoredBatch(batch, scores, response_mask), metrics


def filter_groups(config: SpearConfig, scored: ScoredBatch, seed: int) -> tuple[ScoredBatch, dict[str, float]]:
    """The group-std rollout filter (spec 5.2): keep the rows of the highest-spread groups."""
    ro = config.rollout
    kept, metrics = filter_rollout_by_group_std(
        scored.token_level_scores,
        scored.batch.group_ids,
        scored.batch.traj_ids,
        rollout_filter_ratio=ro.rollout_filter_ratio,
        rollout_filter_type=ro.rollout_filter_type,
        pow2_subsample=ro.rollout_filter_pow2_subsample,
        rng=seed,
    )
    if len(kept) == len(scored.batch):
        return scored, metrics
    idx = torch.as_tensor(kept)
    return ScoredBatch(scored.batch.select(kept), scored.token_level_scores[idx], scored.response_mask[idx]), metrics


@dataclass
class Advantages:
    token_level_rewards: torch.Tensor
    advantages: torch.Tensor
    """[B, L] on-policy advantages (already multiplied by the response mask)."""
    row_advantages: np.ndarray
    """[B] the scalar advantage of each row (0 for a row whose mask is empty)."""
    episode_advantages: np.ndarray
    """[B] the episode-level part (GiGPO without its step term; GRPO: the same as row_advantages)."""


def compute_advantages(config: SpearConfig, scored: ScoredBatch) -> tuple[Advantages, dict[str, float]]:
    """Invalid-action penalty, then GRPO or GiGPO advantages (spec 6).

    The penalty is ``coef`` per invalid action of the row (a step-sample has 0 or 1; a trajectory row
    of the trajectory layout pays for each of its invalid turns).
    """
    algo, batch = config.algorithm, scored.batch
    policy_mask = batch.policy_mask.float()
    step_returns = None
    if algo.adv_estimator == "gigpo":
        step_returns = compute_step_discounted_returns(batch.step_rewards, batch.traj_ids, algo.gamma)
    valid_weight = 1.0 - batch.invalid_actions.astype(np.float64)  # penalty = coef * (1 - weight)
    rewards, step_returns, metrics = apply_invalid_action_penalty(
        scored.token_level_scores, policy_mask, valid_weight, algo.invalid_action_penalty_coef, step_returns
    )
    metrics["valid_action_ratio"] = float(batch.action_valid.mean())
    mask = scored.response_mask
    if algo.adv_estimator == "grpo":
        adv, _ = compute_grpo_outcome_advantage(
            rewards, mask, batch.group_ids, norm_adv_by_std_in_grpo=algo.norm_adv_by_std_in_grpo
        )
        episode = adv
    else:
        adv, _ = compute_gigpo_outcome_advantage(
            rewards,
            step_returns,
            mask,
            np.asarray(batch.anchor_obs, dtype=object),
            batch.group_ids,
            batch.traj_ids,
            step_advantage_w=algo.gigpo.step_advantage_w,
            mode=algo.gigpo.mode,
        )
        episode = episode_norm_reward(
            rewards, mask, batch.group_ids, batch.traj_ids, 1e-6, algo.gigpo.mode == "mean_norm"
        )
    row = _row_scalar(adv, mask)
    metrics = {k: float(v) for k, v in metrics.items()}
    metrics["critic/advantages/mean"] = float(row.mean()) if len(row) else 0.0
    return Advantages(rewards, adv, row, _row_scalar(episode, mask)), metrics


def _row_scalar(token_values: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    """The per-row value of a row-constant [B, L] tensor (0 for rows with an empty mask)."""
    counts = mask.sum(-1)
    sums = (token_values * mask).sum(-1)
    return torch.where(counts > 0, sums / counts.clamp_min(1), torch.zeros_like(sums)).double().numpy()


def sil_batch(scored: ScoredBatch, advantages: Advantages, old_log_probs: torch.Tensor) -> SILBatch:
    """The rows offered to the replay buffer: prompt + response tokens with flag bytes.

    Prompt (and observation) tokens carry no flag; sampled tokens carry MASK_ATTENTION, and
    MASK_RESPONSE when they survived the Dr.BoT filters. ``scores`` are the summed token-level rewards (bonus and penalty in).
    """
    batch = scored.batch
    tokens, logp, flags, lengths = [], [], [], []
    for i in range(len(batch)):
        prompt = batch.prompts[i][batch.prompt_mask[i].bool()]
        keep = batch.attention_mask[i].bool()
        response = batch.responses[i][keep]
        tokens.append(torch.cat([prompt, response]))
        logp.append(torch.cat([torch.zeros(len(prompt)), old_log_probs[i][keep].float()]))
        sampled = batch.policy_mask[i][keep] > 0
        response_flags = MASK_ATTENTION * sampled + MASK_RESPONSE * (scored.response_mask[i][keep] > 0)
        flags.append(torch.cat([torch.zeros(len(prompt), dtype=torch.uint8), response_flags.to(torch.uint8)]))
        lengths.append(len(prompt) + len(response))
    return SILBatch(
        tokens=torch.cat(tokens).numpy(),
        logp=torch.cat(logp).detach().numpy(),
        mask=torch.cat(flags).numpy(),
        lengths=np.array(lengths),
        group_ids=batch.group_ids,
        traj_ids=batch.traj_ids,
        scores=advantages.token_level_rewards.sum(-1).double().numpy(),
        advantages=advantages.row_advantages,
        episode_advantages=advantages.episode_advantages,
    )
