"""Shared helpers for the replay tests: batches, and comparing the C++ index with the numpy oracle."""

from __future__ import annotations

import struct

import numpy as np

from spear_engine.replay import BaselineWindow, NumpyBaselineWindow, NumpyReplayIndex, ReplayIndex
from spear_engine.replay.rng import Xoshiro256StarStar

INDEXES = [ReplayIndex, NumpyReplayIndex]
WINDOWS = [BaselineWindow, NumpyBaselineWindow]
IMPL_IDS = ["cpp", "numpy"]

META_KEYS = ("row_id", "step", "group_id", "traj_id", "score", "advantage", "length")


def make_batch(
    rng: np.random.Generator,
    lengths,
    *,
    steps=None,
    group_ids=None,
    traj_ids=None,
    scores=None,
    advantages=None,
) -> dict[str, np.ndarray]:
    """A batch for insert_batch with random token data over the full dtype ranges."""
    lengths = np.asarray(lengths, dtype=np.int64)
    n, total = len(lengths), int(lengths.sum())
    return {
        "tokens": rng.integers(-(2**31), 2**31 - 1, total, dtype=np.int64).astype(np.int32),
        "logp": rng.standard_normal(total).astype(np.float32),
        "mask": rng.integers(0, 256, total).astype(np.uint8),
        "lengths": lengths,
        "steps": np.zeros(n, np.int64) if steps is None else np.asarray(steps, np.int64),
        "group_ids": np.arange(n, dtype=np.int64) if group_ids is None else np.asarray(group_ids, np.int64),
        "traj_ids": np.arange(n, dtype=np.int64) if traj_ids is None else np.asarray(traj_ids, np.int64),
        "scores": np.zeros(n) if scores is None else np.asarray(scores, np.float64),
        "advantages": np.ones(n) if advantages is None else np.asarray(advantages, np.float64),
    }


def row_slices(batch: dict[str, np.ndarray]) -> list[slice]:
    ends = np.cumsum(batch["lengths"])
    return [slice(int(e - n), int(e)) for e, n in zip(ends, batch["lengths"])]


def outcome(call):
    """The result of call(), or the type of the exception it raised."""
    try:
        return call()
    except Exception as error:  # the type is what we compare
        return type(error)


def same_outcome(a, b) -> bool:
    if isinstance(a, type) or isinstance(b, type):
        return a is b
    if isinstance(a, tuple):
        return len(a) == len(b) and all(same_outcome(x, y) for x, y in zip(a, b))
    if isinstance(a, np.ndarray):
        return (
            isinstance(b, np.ndarray)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and a.tobytes() == b.tobytes()
        )
    if isinstance(a, float):
        return same_float(a, b)
    return a == b


def same_float(a: float, b: float) -> bool:
    """Bit-identical doubles (any NaN matches any NaN: numpy does not promise NaN payloads)."""
    if np.isnan(a) and np.isnan(b):
        return True
    return struct.pack("<d", a) == struct.pack("<d", b)


def assert_same_state(cpp, ref) -> None:
    """Every observable of the two indexes matches, bit for bit."""
    assert len(cpp) == len(ref)
    assert cpp.num_tokens == ref.num_tokens
    assert cpp.next_row_id == ref.next_row_id
    assert same_outcome(cpp.row_ids(), ref.row_ids())
    meta_cpp, meta_ref = cpp.metadata(), ref.metadata()
    assert set(meta_cpp) == set(meta_ref) == set(META_KEYS)
    for key in META_KEYS:
        assert same_outcome(meta_cpp[key], meta_ref[key]), key
    assert cpp.to_bytes() == ref.to_bytes()


def reference_draw(weights: list[int], ids: list[int], seed_or_rng, k: int) -> list[int]:
    """The spec's sequential sampling written as a plain loop (no cumsum arrays, no Fenwick tree)."""
    rng = seed_or_rng if isinstance(seed_or_rng, Xoshiro256StarStar) else Xoshiro256StarStar(seed_or_rng)
    weights = list(weights)
    picks = []
    for _ in range(k):
        total = sum(weights)
        if total == 0:
            break
        x = rng.below(total)
        running = 0
        for i, w in enumerate(weights):
            running += w
            if running > x:
                picks.append(ids[i])
                weights[i] = 0
                break
    return picks
