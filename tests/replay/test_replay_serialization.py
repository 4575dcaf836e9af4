"""Byte format: bit-exact round trips at scale, cross-loading, and rejection of damaged input."""

import struct
import zlib

import numpy as np
import pytest
from replay_helpers import IMPL_IDS, INDEXES, assert_same_state, make_batch

from spear_engine._replay_index import _crc32
from spear_engine.replay import NumpyReplayIndex, ReplayIndex


def test_round_trip_of_100k_rows_is_bit_exact_and_cross_loads():
    rng = np.random.default_rng(100)
    n = 100_000
    batch = make_batch(
        rng,
        rng.integers(0, 9, n),
        steps=rng.integers(0, 50, n),
        group_ids=rng.integers(0, 1000, n),
        traj_ids=rng.integers(0, 2**62, n),
        scores=rng.standard_normal(n),
        advantages=rng.standard_normal(n),
    )
    index = ReplayIndex(capacity_rows=90_000, eviction="lowest_score", seed=77, segment_tokens=4096)
    index.insert_batch(**batch, threshold=-1.5)
    index.remove(rng.integers(0, n, 5_000))  # tombstones inside the table and holes in the arena
    index.draw(16)  # move the generator
    data = index.to_bytes()
    restored = ReplayIndex.from_bytes(data)
    assert restored.to_bytes() == data
    oracle = NumpyReplayIndex.from_bytes(data)
    assert oracle.to_bytes() == data
    assert_same_state(restored, oracle)
    ids = index.row_ids()[::997]
    for a, b in zip(restored.gather(ids), index.gather(ids)):
        assert a.tobytes() == b.tobytes()
    # the restored indexes continue with the same draws
    expected = index.draw(64, "score", score_floor=-0.5)
    assert restored.draw(64, "score", score_floor=-0.5).tolist() == expected.tolist()
    assert oracle.draw(64, "score", score_floor=-0.5).tolist() == expected.tolist()


@pytest.mark.parametrize("Index", INDEXES, ids=IMPL_IDS)
def test_damaged_bytes_are_rejected(Index):
    rng = np.random.default_rng(5)
    index = Index(capacity_rows=10, seed=3)
    index.insert_batch(**make_batch(rng, [2, 0, 3], scores=[1.0, 2.0, 3.0]))
    data = index.to_bytes()
    for position in range(len(data)):  # every single-byte corruption
        corrupted = bytearray(data)
        corrupted[position] ^= 0x41
        with pytest.raises(ValueError):
            Index.from_bytes(bytes(corrupted))
    for size in (0, 7, 104, 107, len(data) - 1):
        with pytest.raises(ValueError):
            Index.from_bytes(data[:size])
    with pytest.raises(ValueError):
        Index.from_bytes(data + b"\0\0\0\0")
    with pytest.raises(ValueError, match="magic"):
        Index.from_bytes(b"X" + data[1:])
    assert Index.from_bytes(data).to_bytes() == data


def _edit(data: bytes, offset: int, fmt: str, *values) -> bytes:
    """Overwrite a field and recompute the checksum, to reach the checks behind the CRC."""
    body = bytearray(data[:-4])
    struct.pack_into(fmt, body, offset, *values)
    return bytes(body) + struct.pack("<I", zlib.crc32(body))


@pytest.mark.parametrize("Index", INDEXES, ids=IMPL_IDS)
def test_inconsistent_content_with_a_valid_checksum_is_rejected(Index):
    rng = np.random.default_rng(6)
    index = Index(capacity_rows=3, seed=3)
    index.insert_batch(**make_batch(rng, [2, 1, 3], scores=[1.0, 2.0, 3.0]))
    data = index.to_bytes()
    n = 3
    meta = 104  # first metadata column: row ids
    bad = {
        "version": _edit(data, 8, "<I", 2),
        "eviction code": _edit(data, 12, "<I", 2),
        "negative capacity": _edit(data, 24, "<q", -1),
        "over capacity": _edit(data, 24, "<q", 2),
        "segment_tokens": _edit(data, 40, "<q", 0),
        "next row id": _edit(data, 48, "<q", 2),
        "zero rng": _edit(data, 56, "<4Q", 0, 0, 0, 0),
        "row ids not increasing": _edit(data, meta, "<qq", 1, 0),
        "negative row id": _edit(data, meta, "<q", -1),
        "nan score": _edit(data, meta + 8 * 4 * n, "<d", float("nan")),
        "negative length": _edit(data, meta + 8 * 6 * n, "<ii", -1, 4),
        "lengths do not sum": _edit(data, meta + 8 * 6 * n, "<i", 1),
    }
    for name, damaged in bad.items():
        with pytest.raises(ValueError):
            Index.from_bytes(damaged)
        assert damaged != data, name


def test_restored_index_keeps_arena_behaviour():
    rng = np.random.default_rng(8)
    index = ReplayIndex(segment_tokens=16)
    batch = make_batch(rng, [5, 20, 0, 7, 16])
    index.insert_batch(**batch)
    restored = ReplayIndex.from_bytes(index.to_bytes())
    stats = restored.arena_stats()
    assert stats["allocated_tokens"] >= restored.num_tokens == 48
    assert stats["dead_tokens"] == 0
    assert restored.tokens(1).tobytes() == batch["tokens"][5:25].tobytes()
    assert not restored.tokens(1).flags.writeable
    restored.insert_batch(**make_batch(rng, [4]))
    assert restored.row_ids().tolist() == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("portable", [False, True], ids=["dispatch", "portable"])
def test_crc32_matches_zlib(portable):
    rng = np.random.default_rng(9)
    for size in [*range(0, 200), 4095, 4096, 65_537, 1_000_003]:
        data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        start = int(rng.integers(0, 2**32))
        assert _crc32(data, start, portable) == zlib.crc32(data, start), size
    data = rng.integers(0, 256, 10_000, dtype=np.uint8).tobytes()
    assert _crc32(data[5000:], _crc32(data[:5000], 0, portable), portable) == zlib.crc32(data)
