"""The pipeline stages of ``data.pad_batch_by_duplication`` and ``algorithm.use_kl_in_reward`` on the
recorded batch: the copies enter the group statistics, GiGPO step returns of a copy are its original's,
and KL-in-reward sits between the invalid-action penalty and the advantages (verl's order)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spear_engine.algorithms.advantages import (
    compute_gigpo_outcome_advantage,
    compute_grpo_outcome_advantage,
    compute_step_discounted_returns,
)
from spear_engine.algorithms.rewards import apply_kl_penalty
from spear_engine.config_loading import load_config
from spear_engine.data import RolloutBatch, load_episodes
from spear_engine.demo import DEFAULT_RECORDING
from spear_engine.pipeline import compute_advantages, pad_batch, score_and_filter, sil_batch


@pytest.fixture(scope="module")
def batch() -> RolloutBatch:
    rollouts, _ = load_episodes(DEFAULT_RECORDING)
    return RolloutBatch.from_episodes(rollouts[0])


def _config(preset: str, *extra: str):
    return load_config(
        preset, ["actor.ppo_mini_batch_size=64", "actor.ppo_micro_batch_size_per_gpu=8", *extra]
    )


def test_padding_appends_seeded_copies_up_to_the_divisor(batch: RolloutBatch) -> None:
    config = _config("grpo", "data.pad_batch_by_duplication=true")
    padded, metrics = pad_batch(config, batch, np.random.default_rng(5))
    assert len(padded) % 64 == 0 and len(padded) - len(batch) == metrics["rollout/duplicated_rows"] > 0
    again, _ = pad_batch(config, batch, np.random.default_rng(5))
    assert torch.equal(padded.responses, again.responses)  # seeded
    n = len(batch)
    assert torch.equal(padded.responses[:n], batch.responses)  # originals first, in order
    for i in range(n, len(padded)):  # every copy is an original row, ids included
        assert any(torch.equal(batch.responses[j], padded.responses[i]) and torch.equal(batch.prompts[j], padded.prompts[i])
                   and (batch.group_ids[j], batch.traj_ids[j], batch.step_index[j])
                   == (padded.group_ids[i], padded.traj_ids[i], padded.step_index[i]) for j in range(n))  # fmt: skip
    off, metrics = pad_batch(_config("grpo"), batch, np.random.default_rng(5))
    assert off is batch and metrics == {}


def test_copies_enter_the_grpo_group_statistics(batch: RolloutBatch) -> None:
    config = _config("grpo", "data.pad_batch_by_duplication=true")
    padded, _ = pad_batch(config, batch, np.random.default_rng(1))
    scored, _ = score_and_filter(config, padded, step=1)
    advantages, _ = compute_advantages(config, scored)
    unpadded, _ = compute_advantages(config, score_and_filter(config, batch, step=1)[0])
    # by hand: GRPO over the padded rows (scores with the invalid-action penalty)
    scores = scored.token_level_scores.sum(-1) - 0.1 * torch.as_tensor(
        padded.invalid_actions, dtype=torch.float32
    )
    for g in np.unique(padded.group_ids):
        rows = np.flatnonzero(padded.group_ids == g)
        values = scores[rows]
        expected = (values - values.mean()) / (values.std() + 1e-6) if len(rows) > 1 else values
        torch.testing.assert_close(torch.as_tensor(advantages.row_advantages[rows], dtype=torch.float32), expected,
                                   rtol=1e-5, atol=1e-5)  # fmt: skip
    assert not np.allclose(advantages.row_advantages[: len(batch)], unpadded.row_advantages)  # copies count


def test_a_copy_keeps_its_originals_gigpo_step_return(batch: RolloutBatch) -> None:
    config = _config("gigpo", "data.pad_batch_by_duplication=true", "algorithm.invalid_action_penalty_coef=0")
    padded, _ = pad_batch(config, batch, np.random.default_rng(2))
    scored, _ = score_and_filter(config, padded, step=1)
    advantages, _ = compute_advantages(config, scored)
    returns = compute_step_discounted_returns(batch.step_rewards, batch.traj_ids, config.algorithm.gamma)
    assert returns.abs().sum() > 0
    # the step term of GiGPO on the padded batch, rebuilt from the originals' returns
    n = len(batch)
    key_of = {(t, s): i for i, (t, s) in enumerate(zip(batch.traj_ids, batch.step_index))}
    padded_returns = torch.stack(
        [returns[key_of[(t, s)]] for t, s in zip(padded.traj_ids, padded.step_index)]
    )
    expected, _ = compute_gigpo_outcome_advantage(
        scored.token_level_scores, padded_returns, scored.response_mask, np.asarray(padded.anchor_obs, dtype=object),
        padded.group_ids, padded.traj_ids, step_advantage_w=1.0, mode=config.algorithm.gigpo.mode,
    )  # fmt: skip
    torch.testing.assert_close(advantages.advantages, expected)
    assert len(padded) > n


def test_kl_in_reward_between_the_penalty_and_the_advantages(batch: RolloutBatch) -> None:
    config = _config(
        "grpo", "algorithm.use_kl_in_reward=true", "algorithm.kl_coef=0.2", "algorithm.kl_penalty=k3"
    )
    scored, _ = score_and_filter(config, batch, step=1)
    g = torch.Generator().manual_seed(0)
    old = -torch.rand(scored.response_mask.shape, generator=g) * 4
    ref = -torch.rand(scored.response_mask.shape, generator=g) * 4
    with pytest.raises(ValueError, match="use_kl_in_reward"):
        compute_advantages(config, scored)
    advantages, metrics = compute_advantages(config, scored, old, ref)
    plain, _ = compute_advantages(load_config("grpo", ["actor.ppo_mini_batch_size=64",
                                                       "actor.ppo_micro_batch_size_per_gpu=8"]), scored)  # fmt: skip
    policy_mask = batch.policy_mask.float()
    expected_rewards, expected_metrics = apply_kl_penalty(
        plain.token_level_rewards, old, ref, policy_mask, 0.2, "k3"
    )
    torch.testing.assert_close(advantages.token_level_rewards, expected_rewards)
    assert metrics["actor/reward_kl_penalty"] == pytest.approx(expected_metrics["actor/reward_kl_penalty"])
    assert metrics["actor/reward_kl_penalty_coeff"] == 0.2
    expected_adv, _ = compute_grpo_outcome_advantage(expected_rewards, scored.response_mask, batch.group_ids,
                                                     norm_adv_by_std_in_grpo=True)  # fmt: skip
    torch.testing.assert_close(advantages.advantages, expected_adv)
    # the replay buffer stores the scores without the KL term (the official reward_tensor)
    rows = sil_batch(scored, advantages, old)
    np.testing.assert_allclose(rows.scores, plain.token_level_rewards.sum(-1).double().numpy())


def test_each_of_w_ranks_pads_to_its_share_of_the_official_divisor(batch: RolloutBatch) -> None:
    config = _config("grpo", "data.pad_batch_by_duplication=true", "actor.ppo_micro_batch_size_per_gpu=16")
    one, _ = pad_batch(config, batch, np.random.default_rng(0), world_size=1)
    assert len(one) % 64 == 0  # lcm(16, 64)
    two, _ = pad_batch(config, batch, np.random.default_rng(0), world_size=2)
    assert len(two) % 32 == 0 and len(batch) <= len(two)  # lcm(16 * 2, 64) / 2
    three, _ = pad_batch(config, batch, np.random.default_rng(0), world_size=3)
    assert len(three) % 64 == 0  # lcm(48, 64) / 3 = 64
