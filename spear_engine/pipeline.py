"""The config-driven stages between a rollout batch and the policy update (run by :mod:`spear_engine.step`).

Each function reads the config, calls the pure algorithm functions and returns plain data plus the
metrics of its stage. :func:`spear_engine.step.train_on_batch` (the step of the trainer and of
``spear demo``) calls them in order; no stage reaches back into another.
"""

from __future__ import annotations

import inspect

import numpy as np
import torch

from spear_engine.algorithms.advantages import compute_step_discounted_returns, get_adv_estimator_fn
from spear_engine.algorithms.batching import duplication_indices, pad_size_divisor
from spear_engine.algorithms.filters import (
    apply_response_filters,
    compute_response_flags,
    filter_rollout_by_group_std,
)
from spear_engine.algorithms.rewards import (
    apply_invalid_action_penalty,
    apply_kl_penalty,
    compute_step_scores,
)
from spear_engine.algorithms.schedules import replay_coefficient, toolcall_bonus_factor
from spear_engine.config import SpearConfig
from spear_engine.data import MASK_ATTENTION, MASK_RESPONSE, Advantages, RolloutBatch, ScoredBatch, SILBatch


def schedule_metrics(config: SpearConfig, step: int) -> dict[str, float]:
    """c(t) and the tool-bonus factor of step t (logged every step)."""
    algo, replay = config.algorithm, config.replay
    return {
        "schedule/replay_coef": replay_coefficient(step, replay.replay_loss_coef, replay.max_replay_loss_steps)
        if replay.enable_trajectory_replay
        else 0.0,
        "schedule/toolcall_bonus_factor": toolcall_bonus_factor(step, algo.use_toolcall_reward, algo.max_toolcall_steps),
    }


def pad_batch(
    config: SpearConfig, batch: RolloutBatch, rng: np.random.Generator, world_size: int = 1
) -> tuple[RolloutBatch, dict[str, float]]:
    """``data.pad_batch_by_duplication`` (official ``adjust_batch(mode="copy")``): append copies of
    random rows (seeded ``rng``) until the batch divides ``D = lcm(micro x W, ppo_mini_batch_size)``. The
    copies keep their group / trajectory ids, so they enter every group statistic. One process pads exactly
    as the official code; with W ranks each pads its own rows to a multiple of D / W, the official share of
    a rank (rows never cross ranks, so the global batch is not padded as one)."""
    if not config.data.pad_batch_by_duplication:
        return batch, {}
    actor = config.actor
    global_divisor = pad_size_divisor(actor.ppo_micro_batch_size_per_gpu, actor.ppo_mini_batch_size, world_size)
    divisor = global_divisor // world_size  # a multiple of the micro-batch size
    extra = duplication_indices(len(batch), divisor, rng)
    metrics = {"rollout/duplicated_rows": float(len(extra))}
    if not len(extra):
        return batch, metrics
    return batch.select(np.concatenate([np.arange(len(batch)), extra])), metrics


def score_and_filter(config: SpearConfig, batch: RolloutBatch, step: int) -> tuple[ScoredBatch, dict[str, float]]:
    """Rewards with the tool-call bonus, then the Dr.BoT response filters (docs/algorithm.md, same sections).

    The filters judge each sampled turn: in the trajectory layout a turn that hit its own budget
    (``data.max_response_length`` tokens), has no action, repeats itself or is unreadable loses its
    tokens from the loss mask; the episode's other turns stay (as its other step-samples would in the
    step layout)."""
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
        spans, turn_ids, turn_texts = batch.turn_samples()
        flags = compute_response_flags(
            turn_ids,
            turn_texts,
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
            policy_mask, **{k: flags[k] if on else None for k, on in enabled.items()}, spans=spans
        )
        metrics.update({k: float(v) for k, v in counts.items()})
    return ScoredBatch(batch, scores, response_mask), metrics


def filter_groups(config: SpearConfig, scored: ScoredBatch, seed: int) -> tuple[ScoredBatch, dict[str, float]]:
    """The group-std rollout filter (docs/algorithm.md, 'Dr.BoT filters'): keep the highest-spread groups."""
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


def compute_advantages(
    config: SpearConfig,
    scored: ScoredBatch,
    old_log_prob: torch.Tensor | None = None,
    ref_log_prob: torch.Tensor | None = None,
) -> tuple[Advantages, dict[str, float]]:
    """Invalid-action penalty, KL-in-reward when ``algorithm.use_kl_in_reward``, then the advantages of the
    estimator registered as ``algorithm.adv_estimator`` (docs/algorithm.md, 'Advantages'), in verl's order.

    The estimator is called with the inputs its signature names (verl's registry convention): the rewards,
    masks and group / trajectory ids of every estimator, plus GiGPO's step returns, anchor observations
    and settings; a new estimator is a new registered function, not an edit here.

    The penalty is ``coef`` per invalid action of the row (a step-sample has 0 or 1; a trajectory row
    of the trajectory layout pays for each of its invalid turns). KL-in-reward needs ``old_log_prob`` and
    ``ref_log_prob`` ([B, L], aligned with the responses) and penalises every sampled token.
    """
    algo, batch = config.algorithm, scored.batch
    estimator = get_adv_estimator_fn(algo.adv_estimator)
    takes = inspect.signature(estimator).parameters
    policy_mask = batch.policy_mask.float()
    step_returns = _step_returns(batch, algo.gamma) if "step_rewards" in takes else None
    valid_weight = 1.0 - batch.invalid_actions.astype(np.float64)  # penalty = coef * (1 - weight)
    rewards, step_returns, metrics = apply_invalid_action_penalty(
        scored.token_level_scores, policy_mask, valid_weight, algo.invalid_action_penalty_coef, step_returns
    )
    scores = rewards
    if algo.use_kl_in_reward:
        if old_log_prob is None or ref_log_prob is None:
            raise ValueError("algorithm.use_kl_in_reward needs the old and the reference log-probs of the batch")
        rewards, kl_metrics = apply_kl_penalty(scores, old_log_prob, ref_log_prob, policy_mask, algo.kl_coef,
                                               algo.kl_penalty)  # fmt: skip
        metrics.update(kl_metrics)
    metrics["valid_action_ratio"] = float(batch.action_valid.mean())
    mask = scored.response_mask
    available = {
        "token_level_rewards": rewards, "response_mask": mask, "index": batch.group_ids,
        "traj_index": batch.traj_ids, "step_rewards": step_returns,
        "anchor_obs": np.asarray(batch.anchor_obs, dtype=object) if "anchor_obs" in takes else None,
        "norm_adv_by_std_in_grpo": algo.norm_adv_by_std_in_grpo,
        "step_advantage_w": algo.gigpo.step_advantage_w, "mode": algo.gigpo.mode,
    }  # fmt: skip
    kwargs = {name: available[name] for name in takes if name in available}
    adv, _ = estimator(**kwargs)
    episode = adv
    if "step_advantage_w" in kwargs:  # an estimator with a step-level term: its episode-level part alone
        episode, _ = estimator(**{**kwargs, "step_advantage_w": 0.0})
    row = _row_scalar(adv, mask)
    metrics = {k: float(v) for k, v in metrics.items()}
    metrics["critic/advantages/mean"] = float(row.mean()) if len(row) else 0.0
    return Advantages(rewards, adv, row, _row_scalar(episode, mask), scores), metrics


def _step_returns(batch: RolloutBatch, gamma: float) -> torch.Tensor:
    """GiGPO discounted step returns. The official code computes them before ``adjust_batch``, so a copy made
    by ``data.pad_batch_by_duplication`` carries its original's return: the recursion runs over the first
    row of each (trajectory, step) and copies get that row's value (without copies: every row itself)."""
    keys = list(zip(batch.traj_ids.tolist(), batch.step_index.tolist()))
    first: dict[tuple[int, int], int] = {}
    for row, key in enumerate(keys):
        first.setdefault(key, row)
    if len(first) == len(keys):
        return compute_step_discounted_returns(batch.step_rewards, batch.traj_ids, gamma)
    originals = np.fromiter(first.values(), dtype=np.int64)
    unique = compute_step_discounted_returns(batch.step_rewards[originals], batch.traj_ids[originals], gamma)
    position = {key: i for i, key in enumerate(first)}
    return unique[torch.as_tensor([position[key] for key in keys])]


def _row_scalar(token_values: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    """The per-row value of a row-constant [B, L] tensor (0 for rows with an empty mask)."""
    counts = mask.sum(-1)
    sums = (token_values * mask).sum(-1)
    return torch.where(counts > 0, sums / counts.clamp_min(1), torch.zeros_like(sums)).double().numpy()


def sil_batch(scored: ScoredBatch, advantages: Advantages, old_log_prob: torch.Tensor) -> SILBatch:
    """The rows offered to the replay buffer: prompt + response tokens with flag bytes.

    Prompt (and observation) tokens carry no flag; sampled tokens carry MASK_ATTENTION, and
    MASK_RESPONSE when they survived the Dr.BoT filters. ``scores`` are the summed token-level scores (bonus and
    penalty in, KL-in-reward out, as the official ``reward_tensor``).
    """
    batch = scored.batch
    tokens, logp, flags, lengths = [], [], [], []
    for i in range(len(batch)):
        prompt = batch.prompts[i][batch.prompt_mask[i].bool()]
        keep = batch.response_attention_mask[i].bool()
        response = batch.responses[i][keep]
        tokens.append(torch.cat([prompt, response]))
        logp.append(torch.cat([torch.zeros(len(prompt)), old_log_prob[i][keep].float()]))
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
        scores=(advantages.token_level_rewards if advantages.token_level_scores is None
                else advantages.token_level_scores).sum(-1).double().numpy(),
        advantages=advantages.row_advantages,
        episode_advantages=advantages.episode_advantages,
    )
