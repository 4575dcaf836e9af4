"""Thread safety: Python threads insert, draw, gather, evict and serialise the same C++ index at once."""

import threading

import numpy as np

from spear_engine.replay import NumpyReplayIndex, ReplayIndex

WRITERS, BATCHES, ROWS = 3, 40, 24


def writer_batch(writer: int, batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Rows whose data encodes their traj id, so any row can be checked on its own."""
    traj_ids = writer * 1_000_000 + batch * 1_000 + np.arange(ROWS)
    lengths = rng.integers(0, 40, ROWS)
    codes = np.repeat(traj_ids, lengths)
    return {
        "tokens": (codes % 2**31).astype(np.int32),
        "logp": (codes % 1000).astype(np.float32),
        "mask": (codes % 251).astype(np.uint8),
        "lengths": lengths,
        "steps": np.full(ROWS, batch),
        "group_ids": np.full(ROWS, writer),
        "traj_ids": traj_ids,
        "scores": rng.standard_normal(ROWS),
        "advantages": rng.standard_normal(ROWS),
    }


def check_row(tokens: np.ndarray, logp: np.ndarray, mask: np.ndarray, traj_id: int) -> None:
    assert (tokens == traj_id % 2**31).all()
    assert (logp == traj_id % 1000).all()
    assert (mask == traj_id % 251).all()


def test_concurrent_use_keeps_every_invariant():
    index = ReplayIndex(capacity_rows=1500, eviction="lowest_score", seed=5, segment_tokens=512)
    errors: list[BaseException] = []
    stop = threading.Event()
    rounds = {"read0": 0, "read1": 0, "sweep": 0}
    minimum_rounds = 30  # readers and the sweeper keep going at least this long, and until writers finish

    def keep_going(kind: str) -> bool:
        rounds[kind] += 1
        return not errors and (not stop.is_set() or rounds[kind] < minimum_rounds)

    def guarded(fn):
        def run(*args):
            try:
                fn(*args)
            except BaseException as error:  # surfaced in the main thread
                errors.append(error)
                stop.set()

        return run

    @guarded
    def write(writer):
        rng = np.random.default_rng(writer)
        for batch in range(BATCHES):
            ids = index.insert_batch(**writer_batch(writer, batch, rng), threshold=-1.0)
            assert len(ids) == ROWS

    @guarded
    def read(seed):
        rng = np.random.default_rng(seed)
        while keep_going(f"read{seed}"):
            drawn = index.draw(16, "uniform" if rng.random() < 0.5 else "score", None, -1.0)
            assert len(set(drawn.tolist())) == len(drawn)
            try:  # rows may be evicted between the draw and the reads
                tokens, logp, mask, lengths = index.gather(drawn)
                meta = index.metadata()  # one snapshot: two calls could see different rows
                meta_of = dict(zip(meta["row_id"].tolist(), meta["traj_id"].tolist()))
                row = int(drawn[0]) if len(drawn) else -1
                view = (index.tokens(row), index.logp(row), index.mask(row)) if row >= 0 else None
            except KeyError:
                continue
            for i, row_id in enumerate(drawn.tolist()):
                if row_id in meta_of:  # ids are never reused, so a known id names the same row
                    n = lengths[i]
                    check_row(tokens[i, :n], logp[i, :n], mask[i, :n], meta_of[row_id])
            if view is not None and row in meta_of:
                check_row(*view, meta_of[row])

    @guarded
    def sweep():
        while keep_going("sweep"):
            index.evict_stale(30)
            index.remove(index.row_ids()[::50])
            restored = ReplayIndex.from_bytes(index.to_bytes())
            assert len(restored) <= 1500

    writers = [threading.Thread(target=write, args=(w,)) for w in range(WRITERS)]
    others = [threading.Thread(target=read, args=(s,)) for s in range(2)] + [threading.Thread(target=sweep)]
    for thread in writers + others:
        thread.start()
    for thread in writers:
        thread.join(timeout=120)
    stop.set()
    for thread in others:
        thread.join(timeout=120)
    assert not errors, errors
    assert min(rounds.values()) >= minimum_rounds

    # final invariants
    meta = index.metadata()
    assert 0 < len(index) <= 1500
    assert (np.diff(meta["row_id"]) > 0).all()
    assert int(meta["length"].sum()) == index.num_tokens
    assert index.next_row_id > meta["row_id"][-1]
    for row_id, traj_id in zip(meta["row_id"].tolist(), meta["traj_id"].tolist()):
        check_row(index.tokens(row_id), index.logp(row_id), index.mask(row_id), traj_id)
    data = index.to_bytes()
    assert NumpyReplayIndex.from_bytes(data).to_bytes() == data
