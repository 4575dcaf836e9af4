"""Hand-computed cases for every ReplayIndex method, run on the C++ index and the numpy oracle."""

import math
import struct
import zlib

import numpy as np
import pytest
from replay_helpers import IMPL_IDS, INDEXES, make_batch, reference_draw, row_slices

from spear_engine.replay.rng import Xoshiro256StarStar

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

pytestmark = pytest.mark.parametrize("Index", INDEXES, ids=IMPL_IDS)


@pytest.fixture
def rng():
    return np.random.default_rng(20250101)


def insert(index, batch, threshold=-math.inf):
    return index.insert_batch(**batch, threshold=threshold)


# ---------------------------------------------------------------------------------------------
# construction and insertion


def test_defaults(Index):
    index = Index()
    assert (len(index), index.num_tokens, index.next_row_id) == (0, 0, 0)
    assert (index.capacity_rows, index.eviction, index.seed, index.segment_tokens) == (
        0,
        "oldest",
        0,
        1 << 20,
    )
    assert index.row_ids().tolist() == []
    assert all(len(v) == 0 for v in index.metadata().values())


def test_insert_admits_strictly_above_threshold_and_numbers_rows(Index, rng):
    index = Index()
    batch = make_batch(
        rng,
        [2, 0, 3, 1],
        steps=[5, 6, 7, 8],
        group_ids=[1, 1, 2, 2],
        traj_ids=[10, 11, 12, 13],
        scores=[0.5, -1.0, 2.0, 0.0],
        advantages=[0.3, 0.1, 0.2, float("nan")],
    )
    ids = insert(index, batch, threshold=0.1)  # 0.1 is not > 0.1; NaN is never admitted
    assert ids.dtype == np.int64 and ids.tolist() == [0, -1, 1, -1]
    assert (len(index), index.num_tokens, index.next_row_id) == (2, 5, 2)
    meta = index.metadata()
    assert meta["row_id"].tolist() == [0, 1]
    assert meta["step"].tolist() == [5, 7]
    assert meta["group_id"].tolist() == [1, 2]
    assert meta["traj_id"].tolist() == [10, 12]
    assert meta["score"].tolist() == [0.5, 2.0]
    assert meta["advantage"].tolist() == [0.3, 0.2]
    assert meta["length"].tolist() == [2, 3] and meta["length"].dtype == np.int32
    slices = row_slices(batch)
    for row_id, j in [(0, 0), (1, 2)]:
        assert index.tokens(row_id).tolist() == batch["tokens"][slices[j]].tolist()
        assert index.logp(row_id).tobytes() == batch["logp"][slices[j]].tobytes()
        assert index.mask(row_id).tolist() == batch["mask"][slices[j]].tolist()
    # row ids keep counting across batches
    assert insert(index, make_batch(rng, [1])).tolist() == [2]


def test_empty_batch_and_empty_rows(Index, rng):
    index = Index()
    assert insert(index, make_batch(rng, [])).tolist() == []
    assert insert(index, make_batch(rng, [0, 0])).tolist() == [0, 1]
    assert (len(index), index.num_tokens) == (2, 0)
    assert index.tokens(0).shape == (0,) and index.tokens(0).dtype == np.int32
    assert index.logp(1).dtype == np.float32 and index.mask(1).dtype == np.uint8


def test_capacity_oldest_evicts_smallest_row_id_even_within_a_batch(Index, rng):
    index = Index(capacity_rows=2, eviction="oldest")
    insert(index, make_batch(rng, [1, 2, 3]))
    assert index.row_ids().tolist() == [1, 2]
    insert(index, make_batch(rng, [1]))
    assert index.row_ids().tolist() == [2, 3]
    assert index.num_tokens == 4


def test_capacity_lowest_score_evicts_smallest_score_then_smallest_id(Index, rng):
    index = Index(capacity_rows=3, eviction="lowest_score")
    insert(index, make_batch(rng, [1, 1, 1], scores=[1.0, 0.5, 0.5]))
    insert(index, make_batch(rng, [1], scores=[2.0]))  # evicts row 1 (0.5, smaller id than row 2)
    assert index.row_ids().tolist() == [0, 2, 3]
    insert(index, make_batch(rng, [1], scores=[-0.0]))  # evicts row 2 (0.5); -0.0 enters
    assert index.row_ids().tolist() == [0, 3, 4]
    insert(index, make_batch(rng, [1], scores=[0.0]))  # -0.0 == 0.0: the tie goes to the smaller id, row 4
    assert index.row_ids().tolist() == [0, 3, 5]


def test_lowest_score_batch_rows_can_evict_each_other(Index, rng):
    index = Index(capacity_rows=2, eviction="lowest_score")
    # r0 and r1 fill the index; r2 evicts r1 (score 1); r3 evicts r2 (3 < 5)
    ids = insert(index, make_batch(rng, [2, 1, 0, 3], scores=[5.0, 1.0, 3.0, 0.0]))
    assert ids.tolist() == [0, 1, 2, 3]
    assert index.row_ids().tolist() == [0, 3]
    assert index.num_tokens == 5


@pytest.mark.parametrize(
    "field, bad",
    [
        ("tokens", np.zeros(3, np.int64)),
        ("tokens", np.zeros((1, 3), np.int32)),
        ("logp", np.zeros(3, np.float64)),
        ("mask", np.zeros(3, np.bool_)),
        ("lengths", np.array([1.0, 2.0])),
        ("lengths", np.array([2, 2])),  # sums to 4, not 3
        ("lengths", np.array([4, -1])),
        ("steps", np.zeros(3, np.int64)),
        ("group_ids", np.zeros(2, np.float64)),
        ("scores", np.array([0.0, float("nan")])),
        ("scores", np.zeros(2, np.bool_)),
        ("advantages", np.zeros(1)),
    ],
)
def test_insert_rejects_bad_input(Index, rng, field, bad):
    index = Index()
    batch = make_batch(rng, [1, 2])
    batch[field] = bad
    with pytest.raises(ValueError):
        insert(index, batch)
    assert len(index) == 0 and index.next_row_id == 0  # nothing half-inserted


def test_insert_rejects_mismatched_token_arrays(Index, rng):
    batch = make_batch(rng, [1, 2])
    batch["logp"] = batch["logp"][:2]
    with pytest.raises(ValueError, match="same length"):
        insert(Index(), batch)


def test_non_contiguous_input_is_accepted(Index, rng):
    batch = make_batch(rng, [2, 2])
    wide = np.zeros(8, np.int32)
    wide[::2] = batch["tokens"]
    batch["tokens"] = wide[::2]
    index = Index()
    insert(index, batch)
    assert index.tokens(1).tolist() == wide[4::2].tolist()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"eviction": "newest"},
        {"capacity_rows": -1},
        {"segment_tokens": 0},
        {"segment_tokens": 2**31},
        {"seed": -1},
        {"seed": 2**64},
        {"seed": 1.5},
    ],
)
def test_constructor_rejects_bad_arguments(Index, kwargs):
    with pytest.raises(ValueError):
        Index(**kwargs)


def test_seed_accepts_full_uint64_range_and_numpy_ints(Index):
    assert Index(seed=2**64 - 1).seed == 2**64 - 1
    assert Index(seed=np.int64(7)).seed == 7


# ---------------------------------------------------------------------------------------------
# row access


def test_views_unknown_and_evicted_ids_raise_key_error(Index, rng):
    index = Index(capacity_rows=1)
    insert(index, make_batch(rng, [1, 1]))
    for row_id in (0, 2, -1):
        for method in (index.tokens, index.logp, index.mask):
            with pytest.raises(KeyError):
                method(row_id)
    assert len(index.tokens(1)) == 1


def test_gather_pads_and_keeps_the_given_order(Index, rng):
    index = Index()
    batch = make_batch(rng, [3, 0, 1])
    insert(index, batch)
    tokens, logp, mask, lengths = index.gather([2, 0, 1, 2], pad_token=-7)
    assert (tokens.dtype, logp.dtype, mask.dtype, lengths.dtype) == (np.int32, np.float32, np.uint8, np.int32)
    assert tokens.shape == logp.shape == mask.shape == (4, 3)
    assert lengths.tolist() == [1, 3, 0, 1]
    t, lp, m = batch["tokens"], batch["logp"], batch["mask"]
    assert tokens.tolist() == [[t[3], -7, -7], t[0:3].tolist(), [-7, -7, -7], [t[3], -7, -7]]
    assert logp[1].tobytes() == lp[0:3].tobytes() and logp[0].tolist() == [lp[3], 0.0, 0.0]
    assert mask.tolist() == [[m[3], 0, 0], m[0:3].tolist(), [0, 0, 0], [m[3], 0, 0]]


def test_gather_edge_cases(Index, rng):
    index = Index()
    insert(index, make_batch(rng, [0, 0]))
    tokens, logp, mask, lengths = index.gather(np.array([], dtype=np.int64))
    assert tokens.shape == logp.shape == mask.shape == (0, 0) and lengths.shape == (0,)
    tokens, _, _, lengths = index.gather([1, 0])
    assert tokens.shape == (2, 0) and lengths.tolist() == [0, 0]
    with pytest.raises(KeyError):
        index.gather([0, 5])
    with pytest.raises(ValueError):
        index.gather([0], pad_token=2**31)
    with pytest.raises(ValueError):
        index.gather([0.0])


# ---------------------------------------------------------------------------------------------
# removal


def test_remove_counts_live_rows_only(Index, rng):
    index = Index()
    insert(index, make_batch(rng, [1, 2, 3, 4]))
    assert index.remove([1, 3, 3, 99, -5]) == 2
    assert index.row_ids().tolist() == [0, 2]
    assert index.num_tokens == 4
    assert index.remove([1]) == 0
    assert index.remove(np.array([], dtype=np.int64)) == 0


def test_evict_stale_relative_to_newest_step(Index, rng):
    index = Index()
    insert(index, make_batch(rng, [1, 1, 1], steps=[1, 5, 7]))
    assert index.evict_stale(2) == 1  # ref 7: 7-1 = 6 > 2 goes, 7-5 = 2 stays
    assert index.row_ids().tolist() == [1, 2]
    assert index.evict_stale(2) == 0


def test_evict_stale_with_current_step(Index, rng):
    index = Index()
    insert(index, make_batch(rng, [1, 1, 1], steps=[1, 5, 7]))
    assert index.evict_stale(3, current_step=8) == 1  # 8-1 = 7 > 3; 8-5 = 3 stays
    assert index.evict_stale(0, current_step=6) == 1  # 6-5 = 1 > 0; 6-7 = -1 stays
    assert index.row_ids().tolist() == [2]
    assert index.evict_stale(-1) == 1  # ref 7: 7-7 = 0 > -1
    assert index.evict_stale(0) == 0  # empty index: nothing happens


def test_evict_stale_with_steps_out_of_order(Index, rng):
    index = Index()
    insert(index, make_batch(rng, [1, 1, 1, 1], steps=[7, 1, 9, 5]))
    assert index.evict_stale(3) == 2  # ref 9: steps 1 and 5 go
    assert index.row_ids().tolist() == [0, 2]
    assert index.evict_stale(1, current_step=9) == 1  # 9-7 = 2 > 1
    assert index.row_ids().tolist() == [2]


def test_evict_stale_has_no_int64_overflow(Index, rng):
    index = Index()
    insert(index, make_batch(rng, [1, 1], steps=[INT64_MIN, INT64_MAX]))
    assert index.evict_stale(INT64_MAX, current_step=INT64_MIN) == 0  # ref - window far below INT64_MIN
    assert index.evict_stale(INT64_MAX) == 1  # ref INT64_MAX: INT64_MAX - INT64_MIN > INT64_MAX
    assert index.row_ids().tolist() == [1]
    assert index.evict_stale(-1, current_step=INT64_MAX) == 1  # ref - window = INT64_MAX + 1


def test_flush_keeps_row_ids_counting_and_the_generator(Index, rng):
    index = Index(seed=3)
    insert(index, make_batch(rng, [2, 2]))
    index.draw(1)
    before = index.to_bytes()
    index.flush()
    after = index.to_bytes()
    assert (len(index), index.num_tokens) == (0, 0)
    assert after[48:88] == before[48:88]  # next row id and the four RNG words
    assert insert(index, make_batch(rng, [1])).tolist() == [2]


def test_count_score_above_is_strict(Index, rng):
    index = Index()
    insert(index, make_batch(rng, [0, 0, 0, 0], scores=[-1.0, 0.0, 0.5, math.inf]))
    assert index.count_score_above(0.0) == 2
    assert index.count_score_above(-math.inf) == 4
    assert index.count_score_above(0.5) == 1
    assert index.count_score_above(math.nan) == 0


# ---------------------------------------------------------------------------------------------
# draws


def test_uniform_draw_follows_the_sequential_rule(Index, rng):
    index = Index(seed=11)
    insert(index, make_batch(rng, [1] * 6))
    drawn = index.draw(4)
    assert drawn.dtype == np.int64
    assert drawn.tolist() == reference_draw([1] * 6, list(range(6)), 11, 4)
    assert len(set(drawn.tolist())) == 4
    # the generator moved on: the next draw continues the same stream
    stream = Xoshiro256StarStar(11)
    reference_draw([1] * 6, list(range(6)), stream, 4)
    assert index.draw(2).tolist() == reference_draw([1] * 6, list(range(6)), stream, 2)


def test_score_draw_uses_exact_integer_weights(Index, rng):
    index = Index(seed=5)
    scores = [0.5, 1.5, -2.0, 2.0**21, 0.25]
    insert(index, make_batch(rng, [1] * 5, scores=scores))
    # floor((s - 0.25) clamped to [0, 2**20] * 2**20)
    weights = [2**18, 5 * 2**18, 0, 2**40, 0]
    assert index.draw(5, "score", score_floor=0.25).tolist() == reference_draw(weights, list(range(5)), 5, 5)


def test_draw_with_candidates_uses_their_order(Index, rng):
    index = Index(seed=9)
    insert(index, make_batch(rng, [1] * 8, scores=np.arange(8.0)))
    candidates = [6, 2, 7, 0]
    expected = reference_draw([1, 1, 1, 1], candidates, 9, 3)
    assert index.draw(3, "uniform", candidates).tolist() == expected
    weights = [6 * 2**20, 2 * 2**20, 7 * 2**20, 0]
    expected = reference_draw(weights, candidates, Xoshiro256StarStar(9), 99)  # fresh stream for the check
    fresh = Index(seed=9)
    insert(fresh, make_batch(rng, [1] * 8, scores=np.arange(8.0)))
    assert fresh.draw(99, "score", np.array(candidates)).tolist() == expected
    assert len(expected) == 3  # row 0 has weight 0 and is never drawn


def test_draw_edge_cases(Index, rng):
    index = Index(seed=1)
    assert index.draw(3).tolist() == []
    insert(index, make_batch(rng, [1, 1, 1]))
    assert index.draw(0).tolist() == []
    assert sorted(index.draw(10).tolist()) == [0, 1, 2]
    assert index.draw(5, "uniform", []).tolist() == []
    assert index.draw(5, "score").tolist() == []  # all scores 0 -> all weights 0


def test_draw_rejects_bad_input_without_consuming_the_generator(Index, rng):
    index = Index(seed=2)
    insert(index, make_batch(rng, [1, 1, 1]))
    before = index.to_bytes()
    with pytest.raises(ValueError):
        index.draw(-1)
    with pytest.raises(ValueError):
        index.draw(1, "weighted")
    with pytest.raises(KeyError):
        index.draw(1, "uniform", [0, 7])
    with pytest.raises(ValueError):
        index.draw(1, "uniform", [1, 0, 1])
    with pytest.raises(ValueError):
        index.draw(1, "score", None, math.inf)
    with pytest.raises(ValueError):
        index.draw(1, "uniform", [0.5])
    assert index.to_bytes() == before


# ---------------------------------------------------------------------------------------------
# bytes


def test_byte_layout_by_hand(Index):
    index = Index(capacity_rows=3, eviction="lowest_score", seed=5, segment_tokens=8)
    batch = {
        "tokens": np.array([7, -1], np.int32),
        "logp": np.array([0.5, -0.25], np.float32),
        "mask": np.array([1, 0], np.uint8),
        "lengths": np.array([2]),
        "steps": np.array([4]),
        "group_ids": np.array([2]),
        "traj_ids": np.array([9]),
        "scores": np.array([1.5]),
        "advantages": np.array([0.5]),
    }
    insert(index, batch)
    total = 104 + 52 + 2 * 9 + 4
    body = (
        b"SPEARRIX"
        + struct.pack("<IIQ", 1, 1, total)
        + struct.pack("<qQqq", 3, 5, 8, 1)
        + struct.pack("<4Q", *Xoshiro256StarStar(5).state)
        + struct.pack("<QQ", 1, 2)
        + struct.pack("<qqqqddi", 0, 4, 2, 9, 1.5, 0.5, 2)
        + struct.pack("<ii", 7, -1)
        + struct.pack("<ff", 0.5, -0.25)
        + bytes([1, 0])
    )
    assert index.to_bytes() == body + struct.pack("<I", zlib.crc32(body))


def test_empty_index_round_trip(Index):
    index = Index(seed=2**64 - 1)
    data = index.to_bytes()
    assert len(data) == 108
    assert Index.from_bytes(data).to_bytes() == data
    assert Index.from_bytes(bytearray(data)).seed == 2**64 - 1


def test_rng_state_is_the_generator_and_restoring_it_undoes_draws(Index, rng):
    index = Index(seed=13)
    assert index.rng_state == Xoshiro256StarStar(13).state  # the seeded words, before any draw
    insert(index, make_batch(rng, [1] * 7))
    saved, before = index.rng_state, index.to_bytes()
    first = index.draw(4).tolist()
    assert index.rng_state != saved and index.to_bytes() != before  # the generator state is serialised
    index.rng_state = saved
    assert index.to_bytes() == before and index.draw(4).tolist() == first
    stream = Xoshiro256StarStar(13)
    reference_draw([1] * 7, list(range(7)), stream, 4)
    assert index.rng_state == stream.state  # the same words as the Python generator after the same draw
    with pytest.raises(ValueError):
        index.rng_state = (0, 0, 0, 0)
    assert index.rng_state == stream.state
