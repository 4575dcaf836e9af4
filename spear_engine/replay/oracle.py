"""Plain-numpy reference for the replay index contract (docs/replay_index_spec.md).

``NumpyReplayIndex`` has the API of the C++ ``ReplayIndex`` in ``spear_engine._replay_index``, makes the
same draws and writes the same bytes. It is the test oracle and the benchmark baseline, so it is written
the obvious way: live rows as numpy columns in row-id order, their data as flat arrays in the same order
(rebuilt on every removal), draws that recompute a cumsum of the remaining weights for every pick. The
baseline window's oracle is :mod:`spear_engine.replay.oracle_window`.
"""

from __future__ import annotations

import math
import operator

import numpy as np

from spear_engine.replay.format import (
    CHECKSUM,
    DATA_COLUMNS,
    EVICTIONS,
    FORMAT_VERSION,
    INDEX_HEADER,
    INDEX_MAGIC,
    MAX_SEGMENT_TOKENS,
    META_COLUMNS,
    ROW_METADATA_BYTES,
    TOKEN_BYTES,
    ColumnReader,
    as_byte_buffer,
    check_checksum,
    check_magic_version_size,
    config_problem,
    lengths_problem,
    rows_problem,
    with_checksum,
)
from spear_engine.replay.oracle_checks import exact_1d, float64_1d, int64_1d, require_length
from spear_engine.replay.rng import MASK64, Xoshiro256StarStar

_WEIGHTINGS = ("uniform", "score")
_MAX_SCORE_UNITS = 2.0**20  # (score - score_floor) is clamped to this
_WEIGHT_SCALE = 2.0**20  # integer weight units per score unit
_MAX_TOTAL_WEIGHT = 1 << 63
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


# ---------------------------------------------------------------------------------------------
# input checks of the index (the same rules and exception types as csrc/bindings.cpp; the array
# checks shared with the window are in spear_engine.replay.oracle_checks)


def _to_seed(seed) -> int:
    try:
        value = operator.index(seed)
    except TypeError:
        value = -1
    if not 0 <= value <= MASK64:
        raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
    return value


def _row_not_found(row_id: int) -> KeyError:
    return KeyError(f"row id {row_id} is not in the replay index (never inserted, evicted or removed)")


def _score_weights(scores: np.ndarray, score_floor: float) -> np.ndarray:
    units = np.minimum(np.maximum(scores - score_floor, 0.0), _MAX_SCORE_UNITS)
    return np.floor(units * _WEIGHT_SCALE).astype(np.uint64)


def _exact_total(weights: np.ndarray) -> int:
    # Each weight is <= 2**40, so chunks of 2**23 sum in uint64 without wrapping.
    chunk = 1 << 23
    return sum(int(weights[i : i + chunk].sum()) for i in range(0, len(weights), chunk))


# ---------------------------------------------------------------------------------------------
# NumpyReplayIndex


class NumpyReplayIndex:
    """The replay index contract in plain numpy (test oracle and benchmark baseline)."""

    def __init__(
        self, capacity_rows: int = 0, eviction: str = "oldest", seed: int = 0, segment_tokens: int = 1 << 20
    ):
        if eviction not in EVICTIONS:
            raise ValueError(f"eviction must be 'oldest' or 'lowest_score', got {eviction!r}")
        seed = _to_seed(seed)
        if capacity_rows < 0:
            raise ValueError(f"capacity_rows must be >= 0 (0 means unlimited), got {capacity_rows}")
        if not 1 <= segment_tokens <= MAX_SEGMENT_TOKENS:
            raise ValueError(f"segment_tokens must be in [1, 2**31 - 1], got {segment_tokens}")
        self._capacity_rows = int(capacity_rows)
        self._eviction = eviction
        self._seed = seed
        self._segment_tokens = int(segment_tokens)  # part of the state only; there is no arena here
        self._next_row_id = 0
        self._rng = Xoshiro256StarStar(seed)
        self._set_rows(
            {name: np.empty(0, dtype) for name, dtype in META_COLUMNS},
            {name: np.empty(0, dtype) for name, dtype in DATA_COLUMNS},
        )

    # -- state ------------------------------------------------------------------------------
    def _set_rows(
        self, meta: dict[str, np.ndarray], data: dict[str, np.ndarray], keep: np.ndarray | None = None
    ):
        """Install the live rows (optionally only those where keep is True); data is never edited in place."""
        if keep is not None and not keep.all():
            token_keep = np.repeat(keep, meta["length"])
            meta = {name: column[keep] for name, column in meta.items()}
            data = {name: column[token_keep] for name, column in data.items()}
        self._meta = meta
        self._data = data
        lengths = meta["length"].astype(np.int64)
        self._starts = np.cumsum(lengths) - lengths

    def _position(self, row_id: int) -> int:
        ids = self._meta["row_id"]
        i = int(np.searchsorted(ids, row_id))
        if i < len(ids) and ids[i] == row_id:
            return i
        raise _row_not_found(row_id)

    def __len__(self) -> int:
        return len(self._meta["row_id"])

    def __repr__(self) -> str:
        return (
            f"NumpyReplayIndex(rows={len(self)}, tokens={self.num_tokens}, capacity_rows={self._capacity_rows}, "
            f"eviction={self._eviction!r}, seed={self._seed}, segment_tokens={self._segment_tokens})"
        )

    @property
    def num_tokens(self) -> int:
        return len(self._data["tokens"])

    @property
    def capacity_rows(self) -> int:
        return self._capacity_rows

    @property
    def eviction(self) -> str:
        return self._eviction

    @property
    def seed(self) -> int:
        return self._seed

    @property
    def segment_tokens(self) -> int:
        return self._segment_tokens

    @property
    def next_row_id(self) -> int:
        return self._next_row_id

    @property
    def rng_state(self) -> tuple[int, int, int, int]:
        """The draw generator's four words; assigning a saved value undoes the draws made since."""
        return self._rng.state

    @rng_state.setter
    def rng_state(self, state: tuple[int, int, int, int]) -> None:
        self._rng = Xoshiro256StarStar.from_state(tuple(state))

    def row_ids(self) -> np.ndarray:
        return self._meta["row_id"].copy()

    def metadata(self) -> dict[str, np.ndarray]:
        return {name: self._meta[name].copy() for name, _ in META_COLUMNS}

    # -- insertion --------------------------------------------------------------------------
    def insert_batch(
        self, tokens, logp, mask, lengths, steps, group_ids, traj_ids, scores, advantages, threshold=-math.inf
    ) -> np.ndarray:
        tokens = exact_1d(tokens, "tokens", np.int32)
        logp = exact_1d(logp, "logp", np.float32)
        mask = exact_1d(mask, "mask", np.uint8)
        lengths = int64_1d(lengths, "lengths")
        n = len(lengths)
        steps, group_ids, traj_ids = (
            int64_1d(a, name)
            for a, name in ((steps, "steps"), (group_ids, "group_ids"), (traj_ids, "traj_ids"))
        )
        scores = float64_1d(scores, "scores")
        advantages = float64_1d(advantages, "advantages")
        for array, name in (
            (steps, "steps"),
            (group_ids, "group_ids"),
            (traj_ids, "traj_ids"),
            (scores, "scores"),
            (advantages, "advantages"),
        ):
            require_length(array, n, name)
        if not len(tokens) == len(logp) == len(mask):
            raise ValueError(
                f"tokens, logp and mask must have the same length, got {len(tokens)}, {len(logp)} and {len(mask)}"
            )
        if n and (lengths.min() < 0 or lengths.max() > _INT32_MAX):
            raise ValueError("lengths must be >= 0 and fit in int32")
        if np.isnan(scores).any():
            raise ValueError("scores must not be NaN")
        if int(lengths.sum()) != len(tokens):
            raise ValueError(
                f"lengths sum to {int(lengths.sum())} but the token arrays hold {len(tokens)} tokens"
            )

        admitted = advantages > float(threshold)
        new_ids = self._next_row_id + np.arange(int(admitted.sum()), dtype=np.int64)
        self._next_row_id += len(new_ids)
        row_ids = np.full(n, -1, dtype=np.int64)
        row_ids[admitted] = new_ids

        new_meta = {
            "row_id": new_ids,
            "step": steps[admitted],
            "group_id": group_ids[admitted],
            "traj_id": traj_ids[admitted],
            "score": scores[admitted],
            "advantage": advantages[admitted],
            "length": lengths[admitted].astype(np.int32),
        }
        token_admitted = np.repeat(admitted, lengths)
        new_data = {
            "tokens": tokens[token_admitted],
            "logp": logp[token_admitted],
            "mask": mask[token_admitted],
        }
        n_old = len(self)
        meta = {name: np.concatenate((self._meta[name], new_meta[name])) for name, _ in META_COLUMNS}
        data = {name: np.concatenate((self._data[name], new_data[name])) for name, _ in DATA_COLUMNS}
        self._set_rows(meta, data, self._survivors(meta["score"], n_old))
        return row_ids

    def _survivors(self, scores: np.ndarray, n_old: int) -> np.ndarray:
        """Which of (old live rows + new rows, in id order) are live once every new row is in."""
        total = len(scores)
        capacity = self._capacity_rows
        keep = np.ones(total, dtype=bool)
        if capacity == 0 or total <= capacity:
            return keep
        if self._eviction == "oldest":
            keep[: total - capacity] = False  # each new row evicts the smallest live row id
            return keep
        # lowest_score: each new row, once the index is full, first evicts the live row with the
        # smallest (score, row id); argmin returns the first minimum, i.e. the smallest id.
        keep[n_old:] = False
        live = n_old
        for i in range(n_old, total):
            if live == capacity:
                candidates = np.flatnonzero(keep)
                keep[candidates[np.argmin(scores[candidates])]] = False
                live -= 1
            keep[i] = True
            live += 1
        return keep

    # -- row data ---------------------------------------------------------------------------
    def _row_view(self, column: str, row_id: int) -> np.ndarray:
        i = self._position(row_id)
        start = int(self._starts[i])
        view = self._data[column][start : start + int(self._meta["length"][i])]
        view.flags.writeable = False
        return view

    def tokens(self, row_id: int) -> np.ndarray:
        return self._row_view("tokens", row_id)

    def logp(self, row_id: int) -> np.ndarray:
        return self._row_view("logp", row_id)

    def mask(self, row_id: int) -> np.ndarray:
        return self._row_view("mask", row_id)

    def gather(self, row_ids, pad_token: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        if not _INT32_MIN <= pad_token <= _INT32_MAX:
            raise ValueError(f"pad_token must fit in int32, got {pad_token}")
        ids = int64_1d(row_ids, "row_ids")
        positions = np.array([self._position(int(r)) for r in ids], dtype=np.int64)
        lengths = self._meta["length"][positions].astype(np.int32)
        width = int(lengths.max()) if len(lengths) else 0
        tokens = np.full((len(ids), width), pad_token, dtype=np.int32)
        logp = np.zeros((len(ids), width), dtype=np.float32)
        mask = np.zeros((len(ids), width), dtype=np.uint8)
        for out_row, (position, length) in enumerate(zip(positions, lengths)):
            start = int(self._starts[position])
            tokens[out_row, :length] = self._data["tokens"][start : start + length]
            logp[out_row, :length] = self._data["logp"][start : start + length]
            mask[out_row, :length] = self._data["mask"][start : start + length]
        return tokens, logp, mask, lengths

    # -- removal ----------------------------------------------------------------------------
    def _drop(self, gone: np.ndarray) -> int:
        count = int(gone.sum())
        if count:
            self._set_rows(self._meta, self._data, ~gone)
        return count

    def remove(self, row_ids) -> int:
        ids = int64_1d(row_ids, "row_ids")
        return self._drop(np.isin(self._meta["row_id"], ids))

    def evict_stale(self, window: int, current_step: int | None = None) -> int:
        if len(self) == 0:
            return 0
        reference = int(current_step) if current_step is not None else int(self._meta["step"].max())
        cutoff = reference - int(window)  # reference - step > window  <=>  step < cutoff (exact ints)
        if cutoff <= _INT64_MIN:
            return 0
        if cutoff > _INT64_MAX:
            return self._drop(np.ones(len(self), dtype=bool))
        return self._drop(self._meta["step"] < cutoff)

    def flush(self) -> None:
        self._set_rows(
            {name: np.empty(0, dtype) for name, dtype in META_COLUMNS},
            {name: np.empty(0, dtype) for name, dtype in DATA_COLUMNS},
        )

    def count_score_above(self, threshold: float) -> int:
        return int((self._meta["score"] > float(threshold)).sum())

    # -- draws ------------------------------------------------------------------------------
    def _candidate_positions(self, candidates: np.ndarray) -> np.ndarray:
        """Positions of the candidates; the first bad one in order decides the error."""
        ids = self._meta["row_id"]
        positions = np.minimum(np.searchsorted(ids, candidates), max(len(ids) - 1, 0))
        found = (ids[positions] == candidates) if len(ids) else np.zeros(len(candidates), dtype=bool)
        _, first_seen = np.unique(candidates, return_index=True)
        repeated = np.ones(len(candidates), dtype=bool)
        repeated[first_seen] = False
        bad = np.flatnonzero(~found | repeated)
        if len(bad):
            i = bad[0]
            if not found[i]:
                raise _row_not_found(int(candidates[i]))
            raise ValueError(f"candidates contain row id {int(candidates[i])} more than once")
        return positions

    def draw(
        self, k: int, weighting: str = "uniform", candidates=None, score_floor: float = 0.0
    ) -> np.ndarray:
        if weighting not in _WEIGHTINGS:
            raise ValueError(f"weighting must be 'uniform' or 'score', got {weighting!r}")
        candidate_ids = None if candidates is None else int64_1d(candidates, "candidates")
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        score_floor = float(score_floor)
        if not math.isfinite(score_floor):
            raise ValueError(f"score_floor must be finite, got {score_floor}")
        if candidate_ids is None:
            ids, scores = self._meta["row_id"], self._meta["score"]
        else:
            positions = self._candidate_positions(candidate_ids)
            ids, scores = self._meta["row_id"][positions], self._meta["score"][positions]
        if weighting == "uniform":
            weights = np.ones(len(ids), dtype=np.uint64)
        else:
            weights = _score_weights(scores, score_floor)
        if _exact_total(weights) >= _MAX_TOTAL_WEIGHT:
            raise ValueError("the total draw weight reaches 2**63; lower the scores or raise score_floor")
        picks = []
        for _ in range(k):
            cumulative = np.cumsum(weights)
            total = int(cumulative[-1]) if len(cumulative) else 0
            if total == 0:
                break
            i = int(np.searchsorted(cumulative, self._rng.below(total), side="right"))
            picks.append(ids[i])
            weights[i] = 0
        return np.array(picks, dtype=np.int64)

    # -- bytes ------------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        n_rows, n_tokens = len(self), self.num_tokens
        total = INDEX_HEADER.size + n_rows * ROW_METADATA_BYTES + n_tokens * TOKEN_BYTES + CHECKSUM.size
        header = INDEX_HEADER.pack(
            INDEX_MAGIC,
            FORMAT_VERSION,
            EVICTIONS.index(self._eviction),
            total,
            self._capacity_rows,
            self._seed,
            self._segment_tokens,
            self._next_row_id,
            *self._rng.state,
            n_rows,
            n_tokens,
        )
        columns = [self._meta[name].astype(dtype, copy=False).tobytes() for name, dtype in META_COLUMNS]
        data = [self._data[name].tobytes() for name, _ in DATA_COLUMNS]
        return with_checksum([header, *columns, *data])

    @classmethod
    def from_bytes(cls, data) -> NumpyReplayIndex:
        what = "replay index"
        buf = as_byte_buffer(data)
        check_magic_version_size(what, buf, INDEX_MAGIC, INDEX_HEADER.size)
        fields = INDEX_HEADER.unpack_from(buf, 0)
        eviction, capacity_rows, seed, segment_tokens, next_row_id = fields[2], *fields[4:8]
        rng_state, n_rows, n_tokens = fields[8:12], fields[12], fields[13]
        body = len(buf) - INDEX_HEADER.size - CHECKSUM.size
        if n_rows * ROW_METADATA_BYTES + n_tokens * TOKEN_BYTES != body:
            raise ValueError(f"{what} bytes are corrupted: the row and token counts do not match the size")
        check_checksum(what, buf)

        reader = ColumnReader(buf, INDEX_HEADER.size)
        meta = {name: reader.take(dtype, n_rows) for name, dtype in META_COLUMNS}
        problem = (
            config_problem(eviction, capacity_rows, segment_tokens)
            or lengths_problem(meta["length"], n_tokens)
            or rows_problem(meta, capacity_rows, next_row_id, rng_state)
        )
        if problem:
            raise ValueError(f"{what} bytes are inconsistent: {problem}")
        index = cls(capacity_rows, EVICTIONS[eviction], seed, segment_tokens)
        index._next_row_id = next_row_id
        index._rng = Xoshiro256StarStar.from_state(rng_state)
        index._set_rows(meta, {name: reader.take(dtype, n_tokens) for name, dtype in DATA_COLUMNS})
        return index
