"""Replay index benchmarks: the C++ index (spear_engine._replay_index) against its numpy oracle.

    pytest bench/bench_replay_index.py --benchmark-enable --benchmark-json=/tmp/replay_index.json
    python bench/replay_results.py /tmp/replay_index.json   # the table in bench/RESULTS.md

Sizes: 10k, 100k and 1M rows of 16-64 tokens (uniform, mean 40), so 1M rows hold 40M tokens, 360 MB
of row data per index. Every operation runs on both implementations with the same data; the
oracle's slow cases (a draw of 2048 recomputes a cumsum over all rows per pick) run few rounds.
Targets, reported rather than asserted: percentile and draw of 2048 at 100k rows >= 20x the oracle,
insert of 2048 x 512 tokens within 2x of a bare memcpy, serialise + restore bit-exact.
"""

from __future__ import annotations

import numpy as np
import pytest

from spear_engine.replay import BaselineWindow, NumpyBaselineWindow, NumpyReplayIndex, ReplayIndex

SIZES = [10_000, 100_000, 1_000_000]
INDEXES = {"cpp": ReplayIndex, "oracle": NumpyReplayIndex}
WINDOWS = {"cpp": BaselineWindow, "oracle": NumpyBaselineWindow}
DRAW_K = 2048
STALE_STEPS = 100  # rows spread over steps 0..99; a window of 89 makes the oldest 10% stale

_cache: dict = {}


def cached(key, build):
    if key not in _cache:
        _cache[key] = build()
    return _cache[key]


def rows(n: int) -> dict[str, np.ndarray]:
    """n rows of 16-64 tokens, steps 0..99 in insertion order, scores ~ N(0, 1)."""

    def build():
        rng = np.random.default_rng(n)
        lengths = rng.integers(16, 65, n)
        total = int(lengths.sum())
        return {
            "tokens": rng.integers(0, 150_000, total, dtype=np.int32),
            "logp": -rng.exponential(1.0, total).astype(np.float32),
            "mask": rng.integers(0, 4, total, dtype=np.uint8),
            "lengths": lengths,
            "steps": np.arange(n, dtype=np.int64) * STALE_STEPS // n,
            "group_ids": rng.integers(0, n // 8, n),
            "traj_ids": np.arange(n, dtype=np.int64),
            "scores": rng.standard_normal(n),
            "advantages": rng.standard_normal(n),
        }

    return cached(("rows", n), build)


def filled(impl: str, n: int):
    def build():
        index = INDEXES[impl](seed=1)
        index.insert_batch(**rows(n))
        return index

    return cached(("index", impl, n), build)


def index_bytes(n: int) -> bytes:
    """The bytes of a freshly filled index (taken before any draw moves its generator)."""
    return cached(("bytes", n), lambda: filled("cpp", n).to_bytes())


ORACLE_DRAW_ROUNDS = {10_000: 5, 100_000: 3, 1_000_000: 1}  # a 1M-row oracle draw takes seconds


def draw_benchmark(benchmark, impl: str, n: int, index, *args):
    """C++ draws calibrate their own rounds; the oracle's run a fixed few."""
    if impl == "cpp":
        return benchmark(index.draw, *args)
    return benchmark.pedantic(index.draw, args=args, rounds=ORACLE_DRAW_ROUNDS[n])


def tag(benchmark, op: str, impl: str, n: int, **extra) -> None:
    benchmark.group = f"{op} | {n} rows"
    benchmark.extra_info.update({"op": op, "impl": impl, "rows": n, **extra})


parametrize_sizes = pytest.mark.parametrize("n", SIZES, ids=[f"{n // 1000}k" for n in SIZES])
parametrize_impls = pytest.mark.parametrize("impl", list(INDEXES))


@parametrize_sizes
@parametrize_impls
def test_insert(benchmark, impl, n):
    tag(benchmark, "insert (one batch of all rows, empty index)", impl, n)
    batch = rows(n)
    # Warm-up rounds let glibc's malloc settle: until its dynamic mmap/trim thresholds have grown,
    # it hands each new index freshly mapped pages (about 6 rounds for the C++ index at 100k rows,
    # 1 for the oracle), and the timings would mostly measure first-touch page faults.
    benchmark.pedantic(
        lambda index: index.insert_batch(**batch),
        setup=lambda: ((INDEXES[impl](),), {}),
        rounds=5 if n < 1_000_000 else 3,
        warmup_rounds=6 if n < 1_000_000 else 1,
    )


@parametrize_sizes
@parametrize_impls
def test_insert_after_flush(benchmark, impl, n):
    # Steady state: the index (and the allocator) reuse memory, so no first-touch page faults.
    tag(benchmark, "insert (one batch of all rows, flushed index)", impl, n)
    batch = rows(n)
    index = INDEXES[impl]()

    def flush():
        index.flush()
        return (), {}

    benchmark.pedantic(
        lambda: index.insert_batch(**batch),
        setup=flush,
        rounds=5 if n < 1_000_000 else 3,
        warmup_rounds=3 if n < 1_000_000 else 1,
    )


@parametrize_sizes
@parametrize_impls
def test_percentile(benchmark, impl, n):
    tag(benchmark, "percentile query (window of n values)", impl, n)

    def build():
        window = WINDOWS[impl]()
        window.push(0, np.round(np.random.default_rng(n).standard_normal(n), 4))  # ties included
        return window

    window = cached(("window", impl, n), build)
    benchmark(window.percentile, 37.5)


@parametrize_sizes
@parametrize_impls
def test_evict_stale(benchmark, impl, n):
    tag(benchmark, "staleness sweep evicting 10%", impl, n)
    data = index_bytes(n)
    evicted = benchmark.pedantic(
        lambda index: index.evict_stale(STALE_STEPS - 11),
        setup=lambda: ((INDEXES[impl].from_bytes(data),), {}),
        rounds=5 if n < 1_000_000 else 3,
    )
    assert evicted == n // 10


@parametrize_sizes
@parametrize_impls
def test_evict_stale_nothing(benchmark, impl, n):
    tag(benchmark, "staleness sweep evicting nothing", impl, n)
    assert benchmark(filled(impl, n).evict_stale, 10 * STALE_STEPS) == 0


@parametrize_sizes
@parametrize_impls
@pytest.mark.parametrize("weighting", ["uniform", "score"])
def test_draw(benchmark, impl, n, weighting):
    tag(benchmark, f"draw {DRAW_K} ({weighting}, all rows)", impl, n)
    drawn = draw_benchmark(benchmark, impl, n, filled(impl, n), DRAW_K, weighting)
    assert len(drawn) == DRAW_K


@parametrize_sizes
@parametrize_impls
def test_draw_with_candidates(benchmark, impl, n):
    tag(benchmark, f"draw {DRAW_K} (uniform, explicit candidates = all rows)", impl, n)
    index = filled(impl, n)
    drawn = draw_benchmark(benchmark, impl, n, index, DRAW_K, "uniform", index.row_ids())
    assert len(drawn) == DRAW_K


@parametrize_sizes
@parametrize_impls
def test_serialise_restore(benchmark, impl, n):
    index = filled(impl, n)
    data = index.to_bytes()
    # restored by its own implementation and by the other one, the bytes come back unchanged
    bit_exact = all(Index.from_bytes(data).to_bytes() == data for Index in INDEXES.values())
    tag(benchmark, "serialise + restore", impl, n, bytes=len(data), bit_exact=bit_exact)
    benchmark.pedantic(
        lambda: INDEXES[impl].from_bytes(index.to_bytes()),
        rounds={10_000: 20, 100_000: 10, 1_000_000: 3}[n]
        if impl == "cpp"
        else {10_000: 10, 100_000: 5, 1_000_000: 3}[n],
        warmup_rounds=1,
    )


# ---------------------------------------------------------------------------------------------
# insert 2048 rows x 512 tokens against a bare memcpy of the same bytes

BIG_ROWS, BIG_LENGTH = 2048, 512


def big_batch() -> dict[str, np.ndarray]:
    def build():
        rng = np.random.default_rng(2048)
        total = BIG_ROWS * BIG_LENGTH
        return {
            "tokens": rng.integers(0, 150_000, total, dtype=np.int32),
            "logp": -rng.exponential(1.0, total).astype(np.float32),
            "mask": rng.integers(0, 4, total, dtype=np.uint8),
            "lengths": np.full(BIG_ROWS, BIG_LENGTH),
            "steps": np.zeros(BIG_ROWS, np.int64),
            "group_ids": np.arange(BIG_ROWS) // 8,
            "traj_ids": np.arange(BIG_ROWS),
            "scores": rng.standard_normal(BIG_ROWS),
            "advantages": rng.standard_normal(BIG_ROWS),
        }

    return cached("big", build)


BIG_OP = f"insert {BIG_ROWS} x {BIG_LENGTH} tokens"


def test_big_memcpy(benchmark):
    tag(benchmark, BIG_OP, "memcpy", BIG_ROWS)
    batch = big_batch()
    sources = [batch["tokens"], batch["logp"], batch["mask"]]
    destinations = [np.empty_like(a) for a in sources]
    for destination, source in zip(destinations, sources):
        np.copyto(destination, source)  # touch the destination pages first

    def copy():
        for destination, source in zip(destinations, sources):
            np.copyto(destination, source)

    benchmark(copy)


@pytest.mark.parametrize("impl", list(INDEXES))
def test_big_insert_after_flush(benchmark, impl):
    # The SPEAR pattern: fill, replay, flush, refill. The C++ index reuses its flushed segment.
    tag(benchmark, BIG_OP, impl, BIG_ROWS)
    batch = big_batch()
    index = INDEXES[impl]()

    def flush():
        index.flush()
        return (), {}

    benchmark.pedantic(
        lambda: index.insert_batch(**batch), setup=flush, rounds=50 if impl == "cpp" else 10, warmup_rounds=2
    )


def test_big_insert_into_new_index(benchmark):
    tag(benchmark, BIG_OP, "cpp-new-index", BIG_ROWS)
    batch = big_batch()
    benchmark.pedantic(
        lambda index: index.insert_batch(**batch),
        setup=lambda: ((ReplayIndex(),), {}),
        rounds=30,
        warmup_rounds=2,
    )
