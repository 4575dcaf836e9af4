"""The draw generator: splitmix64 / xoshiro256** reference values, and C++ == Python bit for bit."""

import numpy as np
import pytest

from spear_engine._replay_index import _rng_below
from spear_engine.replay.rng import MASK64, Xoshiro256StarStar, splitmix64


def test_splitmix64_reference_value():
    # First output of splitmix64 from state 0, as published with the algorithm.
    state, out = splitmix64(0)
    assert state == 0x9E3779B97F4A7C15
    assert out == 0xE220A8397B1DCDAF


def test_xoshiro256starstar_reference_vector():
    # Outputs of the reference C implementation from the state (1, 2, 3, 4).
    rng = Xoshiro256StarStar.from_state((1, 2, 3, 4))
    assert [rng.next_u64() for _ in range(4)] == [11520, 0, 1509978240, 1215971899390074240]


def test_seeding_uses_four_successive_splitmix64_outputs():
    state, words = 42, []
    for _ in range(4):
        state, word = splitmix64(state)
        words.append(word)
    assert Xoshiro256StarStar(42).state == tuple(words)


def test_below_hand_computed():
    rng = Xoshiro256StarStar.from_state((1, 2, 3, 4))
    # x = 11520: high64(11520 * 2**63) = 5760; low64 = 0 < n, but 0 >= (2**64 - n) % n = 0, so accepted.
    assert rng.below(2**63) == 5760
    # x = 0 gives low64 = 0 < threshold (2**64 mod 3 = 1): rejected; x = 1509978240 -> high64(x * 3) = 0.
    assert rng.below(3) == 0
    assert rng.next_u64() == 1215971899390074240  # below(3) consumed exactly two outputs
    assert Xoshiro256StarStar(7).below(1) == 0


@pytest.mark.parametrize("seed", [0, 1, 12345, MASK64, 2**63 + 17])
def test_cpp_below_matches_python_including_rejection(seed):
    rng = np.random.default_rng(seed % 2**32)
    bounds = np.concatenate(
        [
            rng.integers(1, 100, 200).astype(np.uint64),
            rng.integers(1, 2**62, 200, dtype=np.int64).astype(np.uint64),
            # 2**64 mod n is close to 2**63 for these, so about half the draws are rejected
            np.full(50, 2**63 + 1, dtype=np.uint64),
            np.array([2**64 - 1, 2**64 - 3, 3 * 2**62, 2**63], dtype=np.uint64),
        ]
    )
    python_rng = Xoshiro256StarStar(seed)
    expected = [python_rng.below(int(b)) for b in bounds]
    assert _rng_below(seed, bounds).tolist() == expected
    assert all(0 <= x < int(b) for x, b in zip(expected, bounds))


def test_rejection_loop_actually_runs():
    # For n = 2**63 + 1, 2**64 mod n = 2**63 - 1: about half of all x are rejected and redrawn.
    rng = Xoshiro256StarStar(3)
    plain = Xoshiro256StarStar(3)
    for _ in range(64):
        rng.below(2**63 + 1)
    assert rng.state != plain.state
    consumed = 0
    while plain.state != rng.state:
        plain.next_u64()
        consumed += 1
        assert consumed < 1000
    assert consumed > 64


def test_invalid_seeds_and_states():
    with pytest.raises(ValueError):
        Xoshiro256StarStar(-1)
    with pytest.raises(ValueError):
        Xoshiro256StarStar(2**64)
    with pytest.raises(ValueError):
        Xoshiro256StarStar.from_state((0, 0, 0, 0))
    with pytest.raises(ValueError):
        Xoshiro256StarStar(0).below(0)
    with pytest.raises(ValueError):
        _rng_below(-1, np.array([3], dtype=np.uint64))
