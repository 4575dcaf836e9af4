"""``compute_advantages`` dispatches through the advantage-estimator registry: a registered estimator is
selected by ``algorithm.adv_estimator`` and receives the inputs its signature names; GiGPO's episode-level
part (trajectory admission) is its advantage without the step term."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spear_engine.algorithms.advantages import ADV_ESTIMATOR_REGISTRY, episode_norm_reward, register_adv_est
from spear_engine.config_loading import ConfigError, load_config
from spear_engine.data import RolloutBatch, load_episodes
from spear_engine.demo import DEFAULT_RECORDING
from spear_engine.pipeline import compute_advantages, score_and_filter


@pytest.fixture(scope="module")
def batch() -> RolloutBatch:
    rollouts, _ = load_episodes(DEFAULT_RECORDING)
    return RolloutBatch.from_episodes(rollouts[0])


@pytest.fixture
def best_of_group():
    """A toy estimator: +1 for rows holding their group's best score, -1 otherwise (it asks for no GiGPO input)."""
    seen = {}

    @register_adv_est("_best_of_group")
    def estimator(token_level_rewards: torch.Tensor, response_mask: torch.Tensor, index: np.ndarray):
        seen["args"] = (token_level_rewards, response_mask, index)
        scores = token_level_rewards.sum(-1)
        best = {g: scores[index == g].max() for g in np.unique(index)}
        adv = torch.tensor([1.0 if scores[i] == best[g] else -1.0 for i, g in enumerate(index)])
        return adv[:, None] * response_mask, adv[:, None] * response_mask

    yield seen
    del ADV_ESTIMATOR_REGISTRY["_best_of_group"]


def test_a_registered_estimator_is_selected_by_config(batch: RolloutBatch, best_of_group) -> None:
    config = load_config("drbot", ["algorithm.adv_estimator=_best_of_group"])
    scored, _ = score_and_filter(config, batch, step=1)
    advantages, _ = compute_advantages(config, scored)
    rewards, mask, index = best_of_group["args"]
    assert torch.equal(mask, scored.response_mask) and np.array_equal(index, batch.group_ids)
    scores = rewards.sum(-1).numpy()
    for i, g in enumerate(batch.group_ids):
        expected = 1.0 if scores[i] == scores[batch.group_ids == g].max() else -1.0
        if mask[i].any():
            assert advantages.row_advantages[i] == expected
    np.testing.assert_array_equal(advantages.episode_advantages, advantages.row_advantages)  # no step term


def test_unregistered_estimator_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"'_nobody'.*allowed values: 'grpo', 'gigpo'"):
        load_config("grpo", ["algorithm.adv_estimator=_nobody"])


def test_gigpo_episode_part_is_the_episode_level_advantage(batch: RolloutBatch) -> None:
    config = load_config("gigpo-spear")
    scored, _ = score_and_filter(config, batch, step=1)
    advantages, _ = compute_advantages(config, scored)
    episode = episode_norm_reward(advantages.token_level_rewards, scored.response_mask, batch.group_ids,
                                  batch.traj_ids, 1e-6, config.algorithm.gigpo.mode == "mean_norm")  # fmt: skip
    mask = scored.response_mask
    rows = mask.sum(-1) > 0
    expected = ((episode * mask).sum(-1)[rows] / mask.sum(-1)[rows]).double().numpy()
    np.testing.assert_allclose(advantages.episode_advantages[rows.numpy()], expected, rtol=1e-6, atol=1e-7)
    assert not np.allclose(advantages.episode_advantages, advantages.row_advantages)  # the step term matters here
