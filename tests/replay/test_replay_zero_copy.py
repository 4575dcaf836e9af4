"""Zero-copy row views of the C++ index: shared memory, read-only, alive after their rows are gone."""

import gc

import numpy as np
import pytest
from replay_helpers import make_batch, row_slices

from spear_engine.replay import ReplayIndex


def filled_index(rng, lengths, **kwargs):
    index = ReplayIndex(**kwargs)
    batch = make_batch(rng, lengths, scores=rng.standard_normal(len(lengths)))
    index.insert_batch(**batch)
    return index, batch


def test_views_share_the_arena_and_are_read_only():
    rng = np.random.default_rng(0)
    index, batch = filled_index(rng, [5, 7, 3])
    for method, column in (("tokens", "tokens"), ("logp", "logp"), ("mask", "mask")):
        first, second = getattr(index, method)(1), getattr(index, method)(1)
        assert np.shares_memory(first, second)
        assert first.__array_interface__["data"][0] == second.__array_interface__["data"][0]
        assert not first.flags.writeable and not first.flags.owndata
        assert first.tobytes() == batch[column][row_slices(batch)[1]].tobytes()
        with pytest.raises(ValueError):
            first[0] = 0
        with pytest.raises(ValueError):
            first.flags.writeable = True  # numpy refuses: the base is not a writeable array
    # rows of one batch are consecutive in one segment
    tokens0, tokens1 = index.tokens(0), index.tokens(1)
    assert tokens1.__array_interface__["data"][0] == tokens0.__array_interface__["data"][0] + 5 * 4


def test_gather_returns_copies():
    rng = np.random.default_rng(1)
    index, _ = filled_index(rng, [4, 4])
    tokens, _, _, _ = index.gather([0, 1])
    assert tokens.flags.writeable and tokens.flags.owndata
    assert not np.shares_memory(tokens, index.tokens(0))
    tokens[:] = 0
    assert index.tokens(0).any()


def test_views_survive_eviction_compaction_and_deletion_of_the_index():
    rng = np.random.default_rng(2)
    lengths = rng.integers(1, 12, 400)
    index, batch = filled_index(rng, lengths, eviction="lowest_score", segment_tokens=64)
    slices = row_slices(batch)
    views = {r: (index.tokens(r), index.logp(r), index.mask(r)) for r in range(400)}

    # removing most rows, scattered, leaves more dead than live space: the arena compacts
    index.remove(np.flatnonzero(rng.random(400) < 0.8))
    stats = index.arena_stats()
    assert stats["compactions"] >= 1
    assert stats["dead_tokens"] <= index.num_tokens
    survivors = index.row_ids()
    moved = [r for r in survivors if not np.shares_memory(index.tokens(r), views[r][0])]
    assert moved, "compaction should have copied some live rows to fresh segments"

    # capacity eviction and staleness sweeps on top
    index.insert_batch(**make_batch(rng, [3] * 50, scores=np.full(50, 10.0), steps=np.full(50, 100)))
    index.evict_stale(5)
    assert len(index) == 50
    del index
    gc.collect()

    for r, (tokens, logp, mask) in views.items():
        assert tokens.tobytes() == batch["tokens"][slices[r]].tobytes()
        assert logp.tobytes() == batch["logp"][slices[r]].tobytes()
        assert mask.tobytes() == batch["mask"][slices[r]].tobytes()


def test_recycled_segments_never_overwrite_a_viewed_row():
    rng = np.random.default_rng(3)
    index, batch = filled_index(rng, [16] * 4, segment_tokens=64)
    pinned = index.tokens(2)
    expected = batch["tokens"][row_slices(batch)[2]].copy()
    for _ in range(5):  # flush + insert reuses unreferenced segments, never the pinned one
        index.flush()
        index.insert_batch(**make_batch(rng, [16] * 4))
    assert pinned.tobytes() == expected.tobytes()


def test_flush_then_insert_reuses_segment_memory():
    rng = np.random.default_rng(4)
    index, _ = filled_index(rng, [32] * 4, segment_tokens=128)
    address = index.tokens(0).__array_interface__["data"][0]
    index.flush()
    assert index.arena_stats()["spare_segments"] == 1
    batch = make_batch(rng, [32] * 4)
    index.insert_batch(**batch)
    assert index.arena_stats()["spare_segments"] == 0
    assert index.tokens(4).__array_interface__["data"][0] == address
    assert index.tokens(5).tobytes() == batch["tokens"][32:64].tobytes()


def test_long_rows_get_their_own_segment():
    rng = np.random.default_rng(5)
    index, batch = filled_index(rng, [3, 100, 2], segment_tokens=8)
    stats = index.arena_stats()
    assert stats["segments"] == 2 and stats["allocated_tokens"] == 8 + 100
    assert index.tokens(1).tobytes() == batch["tokens"][3:103].tobytes()
    index.remove([1])
    assert index.arena_stats()["allocated_tokens"] == 8
