"""xoshiro256** seeded by splitmix64, in plain Python: the draw generator of the replay index.

Bit-identical to the C++ generator in ``csrc/replay_index.cpp`` (docs/replay_index_spec.md, "RNG"):
the four state words are successive splitmix64 outputs of the seed, and ``below(n)`` is Lemire's
multiply-shift with rejection. Python ints are unbounded, so every step is masked to 64 bits.
"""

from __future__ import annotations

MASK64 = (1 << 64) - 1


def _rotl(x: int, k: int) -> int:
    return ((x << k) | (x >> (64 - k))) & MASK64


def splitmix64(state: int) -> tuple[int, int]:
    """One splitmix64 step: returns (next_state, output)."""
    state = (state + 0x9E3779B97F4A7C15) & MASK64
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return state, z ^ (z >> 31)


class Xoshiro256StarStar:
    """xoshiro256** with 64-bit outputs; ``state`` is the tuple of its four words."""

    def __init__(self, seed: int = 0) -> None:
        if not 0 <= seed <= MASK64:
            raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
        sequence = seed
        words = []
        for _ in range(4):
            sequence, word = splitmix64(sequence)
            words.append(word)
        self._s = words

    @classmethod
    def from_state(cls, state: tuple[int, int, int, int]) -> Xoshiro256StarStar:
        if len(state) != 4 or not all(0 <= w <= MASK64 for w in state):
            raise ValueError("the xoshiro256** state is four 64-bit words")
        if not any(state):
            raise ValueError("the xoshiro256** state must not be all zero")
        rng = cls.__new__(cls)
        rng._s = [int(w) for w in state]
        return rng

    @property
    def state(self) -> tuple[int, int, int, int]:
        return tuple(self._s)  # type: ignore[return-value]

    def next_u64(self) -> int:
        s = self._s
        result = (_rotl((s[1] * 5) & MASK64, 7) * 9) & MASK64
        t = (s[1] << 17) & MASK64
        s[2] ^= s[0]
        s[3] ^= s[1]
        s[1] ^= s[2]
        s[0] ^= s[3]
        s[2] ^= t
        s[3] = _rotl(s[3], 45)
        return result

    def below(self, n: int) -> int:
        """Uniform integer in [0, n) for 1 <= n < 2**64 (Lemire: high word of x*n, reject biased lows)."""
        if not 1 <= n <= MASK64:
            raise ValueError(f"below() needs 1 <= n < 2**64, got {n}")
        m = self.next_u64() * n
        low = m & MASK64
        if low < n:
            threshold = ((1 << 64) - n) % n
            while low < threshold:
                m = self.next_u64() * n
                low = m & MASK64
        return m >> 64
