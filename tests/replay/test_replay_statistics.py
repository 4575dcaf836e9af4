"""Statistical checks of the C++ draws: uniform draws are uniform, score draws follow the weights.

Fixed seeds keep the tests deterministic; the thresholds (p > 1e-4) would catch an off-by-one in
the Fenwick search or a biased below() at these sample sizes.
"""

import math

import numpy as np
from replay_helpers import make_batch

from spear_engine.replay import ReplayIndex


def chi_square_p_value(observed: np.ndarray, expected: np.ndarray) -> float:
    """Upper-tail p-value of Pearson's statistic (Wilson-Hilferty approximation; no scipy)."""
    statistic = float(((observed - expected) ** 2 / expected).sum())
    dof = len(observed) - 1
    z = ((statistic / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    return 0.5 * math.erfc(z / math.sqrt(2))


def test_chi_square_helper_has_power():
    expected = np.full(10, 1000.0)
    assert chi_square_p_value(expected.copy(), expected) > 0.5
    skewed = expected.copy()
    skewed[0] += 150
    skewed[1] -= 150
    assert chi_square_p_value(skewed, expected) < 1e-4


def test_uniform_single_draws_are_uniform():
    n, draws = 40, 40_000
    index = ReplayIndex(seed=12345)
    index.insert_batch(**make_batch(np.random.default_rng(0), [1] * n))
    counts = np.bincount([int(index.draw(1)[0]) for _ in range(draws)], minlength=n)
    assert chi_square_p_value(counts, np.full(n, draws / n)) > 1e-4


def test_uniform_draws_without_replacement_are_uniform_in_every_position():
    n, k, draws = 30, 6, 8_000
    index = ReplayIndex(seed=99)
    index.insert_batch(**make_batch(np.random.default_rng(1), [1] * n))
    picks = np.array([index.draw(k) for _ in range(draws)])
    assert all(len(set(row)) == k for row in picks.tolist())
    for position in range(k):  # each pick position is itself uniform over the rows
        counts = np.bincount(picks[:, position], minlength=n)
        assert chi_square_p_value(counts, np.full(n, draws / n)) > 1e-4


def test_score_weighted_frequencies_match_the_weights():
    scores = np.array([0.25, 0.5, 1.0, 2.0, 4.0, 0.0, -3.0, 1.5])
    draws = 60_000
    index = ReplayIndex(seed=2024)
    index.insert_batch(**make_batch(np.random.default_rng(2), [2] * len(scores), scores=scores))
    counts = np.bincount([int(index.draw(1, "score")[0]) for _ in range(draws)], minlength=len(scores))
    assert counts[5] == counts[6] == 0  # zero weight: never drawn
    positive = scores > 0
    expected = scores[positive] / scores[positive].sum() * draws
    assert chi_square_p_value(counts[positive], expected) > 1e-4


def test_score_weighted_second_pick_is_conditional_on_the_first():
    # Without replacement: after drawing row a, row b is drawn with probability w_b / (W - w_a).
    scores = np.array([1.0, 2.0, 3.0])
    index = ReplayIndex(seed=7)
    index.insert_batch(**make_batch(np.random.default_rng(3), [1, 1, 1], scores=scores))
    pairs = np.array([index.draw(2, "score") for _ in range(30_000)])
    firsts = pairs[:, 0]
    for first in range(3):
        seconds = pairs[firsts == first, 1]
        others = [r for r in range(3) if r != first]
        observed = np.array([(seconds == r).sum() for r in others])
        expected = scores[others] / scores[others].sum() * len(seconds)
        assert chi_square_p_value(observed, expected) > 1e-4
