"""advantages: GRPO and GiGPO by hand, against independent implementations, and properties."""

from __future__ import annotations

import math
import statistics
from enum import Enum

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spear_engine.algorithms import advantages as A
from spear_engine.algorithms.advantages import (
    build_step_group,
    compute_gigpo_outcome_advantage,
    compute_grpo_outcome_advantage,
    compute_step_discounted_returns,
    episode_norm_reward,
    get_adv_estimator_fn,
    register_adv_est,
    step_norm_reward,
    to_hashable,
)

EPS = 1e-6


def rewards_at_end(scores, width=4, lengths=None):
    """[B, T] token rewards with each score at the row's last valid token, and the mask."""
    lengths = lengths or [width] * len(scores)
    rewards = torch.zeros(len(scores), width)
    mask = torch.zeros(len(scores), width)
    for i, (s, n) in enumerate(zip(scores, lengths)):
        rewards[i, n - 1] = s
        mask[i, :n] = 1
    return rewards, mask


# --------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------
class _Est(Enum):
    GRPO = "grpo"


def test_registry():
    assert get_adv_estimator_fn("grpo") is compute_grpo_outcome_advantage
    assert get_adv_estimator_fn(_Est.GRPO) is compute_grpo_outcome_advantage
    assert get_adv_estimator_fn("gigpo") is compute_gigpo_outcome_advantage
    with pytest.raises(ValueError, match="grpo"):
        get_adv_estimator_fn("gae")
    with pytest.raises(ValueError):
        register_adv_est("grpo")(lambda: None)

    @register_adv_est("_test_est")
    def est():
        return None

    try:
        assert get_adv_estimator_fn("_test_est") is est
        register_adv_est("_test_est")(est)  # re-registering the same function is fine
    finally:
        A.ADV_ESTIMATOR_REGISTRY.pop("_test_est")


# --------------------------------------------------------------------------------------------
# GRPO
# --------------------------------------------------------------------------------------------
def test_grpo_by_hand():
    rewards, mask = rewards_at_end([1.0, 2.0, 3.0, 5.0], lengths=[4, 2, 3, 1])
    index = np.array(["a", "a", "a", "b"], dtype=object)
    adv, ret = compute_grpo_outcome_advantage(rewards, mask, index)
    # group a: mean 2, unbiased std 1; group b alone: mean 0, std 1
    want = [-1 / (1 + EPS), 0.0, 1 / (1 + EPS), 5 / (1 + EPS)]
    assert adv[:, 0].tolist() == pytest.approx(want, rel=1e-6)
    assert torch.equal(adv, ret)
    assert torch.equal(adv != 0, (mask > 0) & (torch.tensor(want)[:, None] != 0))
    adv, _ = compute_grpo_outcome_advantage(rewards, mask.bool(), index, norm_adv_by_std_in_grpo=False)
    assert adv[:, 0].tolist() == pytest.approx([-1.0, 0.0, 1.0, 5.0])
    assert adv.dtype == torch.float32


def test_grpo_all_equal_group_and_integer_and_tensor_ids():
    rewards, mask = rewards_at_end([2.0, 2.0, 0.0, 4.0])
    for index in (np.array([7, 7, 9, 9]), torch.tensor([7, 7, 9, 9]), [7, 7, 9, 9]):
        adv, _ = compute_grpo_outcome_advantage(rewards, mask, index)
        assert adv[:, 0].tolist() == pytest.approx(
            [0.0, 0.0, -2 / (math.sqrt(8) + EPS), 2 / (math.sqrt(8) + EPS)]
        )


def _grpo_reference(scores, index, norm):
    out = []
    for i, s in enumerate(scores):
        group = [scores[j] for j in range(len(scores)) if index[j] == index[i]]
        mean, std = (0.0, 1.0) if len(group) == 1 else (statistics.fmean(group), statistics.stdev(group))
        out.append((s - mean) / (std + EPS) if norm else s - mean)
    return out


@pytest.mark.parametrize("norm", [True, False])
def test_grpo_random_against_reference(norm):
    rng = np.random.default_rng(0)
    index = rng.choice(["x", "y", "z", "solo"], size=40, p=[0.4, 0.3, 0.29, 0.01]).astype(object)
    scores = rng.normal(size=40).round(3)
    rewards, mask = rewards_at_end(scores.tolist(), width=5, lengths=rng.integers(1, 6, size=40).tolist())
    adv, _ = compute_grpo_outcome_advantage(rewards, mask, index, norm_adv_by_std_in_grpo=norm)
    want = torch.tensor(_grpo_reference(scores.tolist(), list(index), norm), dtype=torch.float64)
    torch.testing.assert_close(adv.double(), want[:, None] * mask.double(), rtol=1e-5, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(
    groups=st.lists(
        st.lists(st.floats(-5, 5, allow_nan=False), min_size=2, max_size=6), min_size=1, max_size=5
    ),
    norm=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_property_grpo_centred_and_order_invariant(groups, norm, seed):
    scores = [s for g in groups for s in g]
    index = np.array([k for k, g in enumerate(groups) for _ in g])
    rewards, mask = rewards_at_end(scores, width=1)
    adv, _ = compute_grpo_outcome_advantage(rewards, mask, index, norm_adv_by_std_in_grpo=norm)
    for k in range(len(groups)):
        assert abs(adv[index == k, 0].sum().item()) < 1e-3 * max(1.0, len(groups[k]))
    perm = np.random.default_rng(seed).permutation(len(scores))
    adv_p, _ = compute_grpo_outcome_advantage(
        rewards[perm], mask[perm], index[perm], norm_adv_by_std_in_grpo=norm
    )
    torch.testing.assert_close(adv_p, adv[perm])


# --------------------------------------------------------------------------------------------
# GiGPO
# --------------------------------------------------------------------------------------------
def test_step_discounted_returns_by_hand():
    traj = np.array(["a", "b", "a", "b", "a"])
    returns = compute_step_discounted_returns([0.0, 1.0, 0.0, 0.0, 10.0], traj, gamma=0.5)
    assert returns.dtype == torch.float32
    assert returns.tolist() == pytest.approx([2.5, 1.0, 5.0, 0.0, 10.0])
    assert compute_step_discounted_returns([1.0, 1.0], ["t", "t"], gamma=1.0).tolist() == [2.0, 1.0]
    with pytest.raises(ValueError):
        compute_step_discounted_returns([1.0, 1.0], ["t", "t"], 0.9, active_masks=[True, False])


def _hand_batch():
    index = np.array(["u1", "u1", "u1", "u1", "u1", "u2"], dtype=object)
    traj = np.array(["a", "a", "b", "b", "b", "c"], dtype=object)
    obs = np.array(["s0", "s1", "s0", "s1", "s2", "s0"], dtype=object)
    rewards, mask = rewards_at_end([1.0, 1.0, 0.0, 0.0, 0.0, 4.0], width=3, lengths=[3, 2, 3, 1, 3, 2])
    step_returns = torch.tensor([2.0, 3.0, 0.0, 1.0, 5.0, 7.0])
    return rewards, step_returns, mask, obs, index, traj


def test_gigpo_mean_norm_by_hand():
    rewards, step_returns, mask, obs, index, traj = _hand_batch()
    # episode: u1 scores [1,1,0,0,0] -> mean 0.4; u2 alone -> mean 0.
    # step groups: (u1,s0) rows 0,2 returns [2,0]; (u1,s1) rows 1,3 [3,1]; (u1,s2), (u2,s0) alone -> 0
    for w, want in [(1.0, [1.6, 1.6, -1.4, -1.4, -0.4, 4.0]), (0.5, [1.1, 1.1, -0.9, -0.9, -0.4, 4.0])]:
        adv, ret = compute_gigpo_outcome_advantage(
            rewards, step_returns, mask, obs, index, traj, step_advantage_w=w, mode="mean_norm"
        )
        assert adv[:, 0].tolist() == pytest.approx(want, rel=1e-6)
        assert torch.equal(adv, ret) and torch.equal(adv != 0, mask > 0)


def test_gigpo_mean_std_norm_by_hand():
    rewards, step_returns, mask, obs, index, traj = _hand_batch()
    adv, _ = compute_gigpo_outcome_advantage(
        rewards, step_returns, mask, obs, index, traj, mode="mean_std_norm"
    )
    ep_std = math.sqrt(0.3)
    ep = [0.6 / (ep_std + EPS)] * 2 + [-0.4 / (ep_std + EPS)] * 3 + [4.0 / (1 + EPS)]
    st_ = [
        1 / (math.sqrt(2) + EPS),
        1 / (math.sqrt(2) + EPS),
        -1 / (math.sqrt(2) + EPS),
        -1 / (math.sqrt(2) + EPS),
        0,
        0,
    ]
    assert adv[:, 0].tolist() == pytest.approx([e + s for e, s in zip(ep, st_)], rel=1e-5)
    with pytest.raises(ValueError):
        compute_gigpo_outcome_advantage(rewards, step_returns, mask, obs, index, traj, mode="std")


def test_episode_norm_reward_per_trajectory_statistics():
    rewards, _, mask, _, index, traj = _hand_batch()
    adv = episode_norm_reward(rewards, mask, index, traj, compute_mean_std_cross_all_data=False)
    # u1 statistics from the first step of each trajectory: scores [1, 0] -> mean 0.5
    assert adv[:, 0].tolist() == pytest.approx([0.5, 0.5, -0.5, -0.5, -0.5, 4.0])


def test_step_norm_reward_singletons_are_zero():
    adv = step_norm_reward(
        torch.tensor([3.0, 9.0, 1.0]), torch.ones(3, 2), np.array([0, 1, 0]), remove_std=False
    )
    assert adv[:, 1].tolist() == pytest.approx([1 / (math.sqrt(2) + EPS), 0.0, -1 / (math.sqrt(2) + EPS)])


def test_build_step_group_and_to_hashable():
    index = np.array(["u1", "u1", "u2", "u1", "u2"], dtype=object)
    obs = [
        np.array([[1, 2], [3, 4]]),
        [1, 2, 3, 4],
        np.array([[1, 2], [3, 4]]),
        (1, 2, 3, 4),
        {"b": [1], "a": 2},
    ]
    groups = build_step_group(obs, index)
    assert groups.dtype == np.int64
    # rows 0, 1, 3 are the same state in u1 (array / list / tuple of the same numbers); row 2 is u2's
    assert groups[0] == groups[1] == groups[3] and groups[2] != groups[0] and groups[4] != groups[2]
    assert to_hashable({"b": [1], "a": np.float32(2.0)}) == (("a", 2.0), ("b", (1,)))
    assert to_hashable(np.int64(3)) == 3 and isinstance(to_hashable(np.int64(3)), int)
    with pytest.raises(TypeError):
        to_hashable(None)
    with pytest.raises(ValueError):
        build_step_group(obs[:2], index)


def _gigpo_reference(scores, step_returns, obs, index, w, std_norm):
    """Straightforward GiGPO (docs/algorithm.md, 'GiGPO'), float64, no shared code with the implementation."""

    def norm(values, members, singleton_self):
        out = []
        for i in range(len(values)):
            group = [values[j] for j in members(i)]
            if len(group) == 1:
                mean, std = (values[i] if singleton_self else 0.0), 1.0
            else:
                mean, std = statistics.fmean(group), statistics.stdev(group)
            out.append((values[i] - mean) / (std + EPS) if std_norm else values[i] - mean)
        return out

    n = len(scores)
    episode = norm(scores, lambda i: [j for j in range(n) if index[j] == index[i]], False)
    step = norm(
        step_returns, lambda i: [j for j in range(n) if index[j] == index[i] and obs[j] == obs[i]], True
    )
    return [e + w * s for e, s in zip(episode, step)]


@pytest.mark.parametrize("mode", ["mean_norm", "mean_std_norm"])
def test_gigpo_random_against_reference(mode):
    rng = np.random.default_rng(1)
    n = 60
    index = rng.choice(["g0", "g1", "g2", "g3"], size=n).astype(object)
    traj = np.array([f"{g}-{k}" for g, k in zip(index, rng.integers(0, 4, size=n))], dtype=object)
    obs = rng.choice(["kitchen", "hall", "desk", "shelf", "bed"], size=n).astype(object)
    scores = rng.choice([0.0, 10.0], size=n) + rng.uniform(0, 1, size=n).round(2)
    env_rewards = rng.choice([0.0, 0.0, 1.0], size=n)
    step_returns = compute_step_discounted_returns(env_rewards, traj, gamma=0.95)
    rewards, mask = rewards_at_end(scores.tolist(), width=4, lengths=rng.integers(1, 5, size=n).tolist())
    adv, _ = compute_gigpo_outcome_advantage(
        rewards, step_returns, mask, obs, index, traj, step_advantage_w=0.7, mode=mode
    )
    want = _gigpo_reference(
        scores.tolist(), step_returns.double().tolist(), list(obs), list(index), 0.7, mode == "mean_std_norm"
    )
    torch.testing.assert_close(
        adv.double(), torch.tensor(want)[:, None] * mask.double(), rtol=1e-5, atol=1e-5
    )


def test_step_discounted_returns_random_against_reference():
    rng = np.random.default_rng(2)
    traj = rng.choice(["a", "b", "c"], size=30)
    rewards = rng.normal(size=30)
    ours = compute_step_discounted_returns(rewards, traj, gamma=0.9)
    for t in "abc":
        rows = [i for i in range(30) if traj[i] == t]
        for pos, row in enumerate(rows):
            want = sum(0.9**k * np.float32(rewards[r]) for k, r in enumerate(rows[pos:]))
            assert ours[row].item() == pytest.approx(want, rel=1e-5, abs=1e-6)
