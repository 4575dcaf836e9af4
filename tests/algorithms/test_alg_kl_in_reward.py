"""KL-in-reward (verl ``apply_kl_penalty``, fixed controller) and batch padding by duplication
(verl-agent ``adjust_batch(mode="copy")``), against their formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from spear_engine.algorithms.batching import duplication_indices, pad_size_divisor
from spear_engine.algorithms.rewards import apply_kl_penalty

KINDS_BY_HAND = {
    # delta = logp - ref
    "kl": lambda d: d,
    "k1": lambda d: d,
    "abs": lambda d: abs(d),
    "mse": lambda d: 0.5 * d * d,
    "k2": lambda d: 0.5 * d * d,
    "low_var_kl": lambda d: min(10.0, max(-10.0, math.exp(-d) + d - 1)),
    "k3": lambda d: min(10.0, max(-10.0, math.exp(-d) + d - 1)),
}


def _inputs():
    g = torch.Generator().manual_seed(3)
    old = -torch.rand(3, 5, generator=g) * 3
    ref = -torch.rand(3, 5, generator=g) * 3
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.float32)
    scores = torch.zeros(3, 5)
    scores[0, 2], scores[1, 4], scores[2, 4] = 10.0, -0.1, 1.0
    return scores, old, ref, mask


@pytest.mark.parametrize("kind", sorted(KINDS_BY_HAND))
def test_kl_in_reward_is_scores_minus_beta_kl_per_sampled_token(kind: str) -> None:
    scores, old, ref, mask = _inputs()
    beta = 0.05
    before = (scores.clone(), old.clone(), ref.clone())
    rewards, metrics = apply_kl_penalty(scores, old, ref, mask, beta, kind)
    row_kls = []
    for i in range(3):
        kls = []
        for k in range(5):
            kl = KINDS_BY_HAND[kind](float(old[i, k] - ref[i, k])) if mask[i, k] else 0.0
            kls.append(kl)
            assert float(rewards[i, k]) == pytest.approx(float(scores[i, k]) - beta * kl, rel=1e-5, abs=1e-6)
        valid = int(mask[i].sum())
        row_kls.append(sum(kls) / valid if valid else 0.0)  # verl masked_mean: empty row -> 0
    assert metrics["actor/reward_kl_penalty"] == pytest.approx(sum(row_kls) / 3, rel=1e-5)
    assert metrics["actor/reward_kl_penalty_coeff"] == beta
    for a, b in zip(before, (scores, old, ref)):
        assert torch.equal(a, b)  # inputs untouched


def test_kl_in_reward_leaves_unsampled_tokens_and_zero_beta_alone() -> None:
    scores, old, ref, mask = _inputs()
    rewards, _ = apply_kl_penalty(scores, old, ref, mask, 0.3, "k3")
    assert torch.equal(rewards[mask == 0], scores[mask == 0])  # the score of an empty row stays where it is
    same, metrics = apply_kl_penalty(scores, old, ref, mask, 0.0, "kl")
    assert torch.equal(same, scores) and metrics["actor/reward_kl_penalty_coeff"] == 0.0
    identical, metrics = apply_kl_penalty(scores, old, old, mask, 1.0, "low_var_kl")
    assert torch.equal(identical, scores) and metrics["actor/reward_kl_penalty"] == 0.0


def test_kl_in_reward_sums_into_the_sequence_score() -> None:
    """GRPO sums token-level rewards: the row score loses beta * sum of its tokens' KL."""
    scores, old, ref, mask = _inputs()
    rewards, _ = apply_kl_penalty(scores, old, ref, mask, 0.1, "kl")
    expected = scores.sum(-1) - 0.1 * ((old - ref) * mask).sum(-1)
    torch.testing.assert_close(rewards.sum(-1), expected)


def test_kl_in_reward_rejects_full() -> None:
    scores, old, ref, mask = _inputs()
    with pytest.raises(NotImplementedError):
        apply_kl_penalty(scores, old, ref, mask, 0.1, "full")


# --------------------------------------------------------------------------------------------
# batch padding by duplication
# --------------------------------------------------------------------------------------------
def test_pad_size_divisor_is_the_official_lcm() -> None:
    assert pad_size_divisor(8, 1024, 2) == 1024  # official ALFWorld: lcm(8*2, 8*2, 1024)
    assert pad_size_divisor(8, 256, 2) == 256
    assert pad_size_divisor(4, 6, 1) == 12
    assert pad_size_divisor(3, 8, 2) == 24
    with pytest.raises(ValueError):
        pad_size_divisor(0, 8)


@pytest.mark.parametrize(("size", "divisor"), [(5, 8), (13, 8), (3, 4), (16, 8), (7, 7), (30, 16)])
def test_duplication_indices_draw_distinct_rows_to_the_next_multiple(size: int, divisor: int) -> None:
    extra = duplication_indices(size, divisor, np.random.default_rng(0))
    assert (size + len(extra)) % divisor == 0 and len(extra) < divisor
    assert len(set(extra.tolist())) == len(extra)  # without replacement, as np.random.choice(replace=False)
    assert all(0 <= i < size for i in extra)
    assert extra.dtype == np.int64


def test_duplication_indices_are_seeded_and_uniform() -> None:
    a = duplication_indices(10, 16, np.random.default_rng(7))
    b = duplication_indices(10, 16, np.random.default_rng(7))
    assert np.array_equal(a, b)
    counts = np.zeros(10)
    rng = np.random.default_rng(1)
    for _ in range(4000):
        counts[duplication_indices(10, 8, rng)] += 1  # 6 copies of 10 rows per draw
    assert np.allclose(counts / 4000, 0.6, atol=0.04)


def test_duplication_indices_when_more_copies_than_rows_are_needed() -> None:
    """The official draw raises here (replace=False); every row is copied once per whole round."""
    extra = duplication_indices(3, 16, np.random.default_rng(0))
    assert len(extra) == 13
    assert sorted(np.bincount(extra, minlength=3).tolist()) == [4, 4, 5]
    assert len(duplication_indices(0, 8, np.random.default_rng(0))) == 0
