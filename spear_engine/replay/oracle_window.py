"""Plain-numpy reference for the baseline window of the replay contract (docs/replay_index_spec.md).

``NumpyBaselineWindow`` has the API of the C++ ``BaselineWindow`` in ``spear_engine._replay_index`` and
writes the same bytes (:mod:`spear_engine.replay.format`). It is the test oracle and the benchmark
baseline, so it is written the obvious way: the values as one numpy array, percentiles via np.percentile.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from spear_engine.replay.format import (
    BASELINE_EVICTIONS,
    BASELINE_HEADER,
    BASELINE_MAGIC,
    CHECKSUM,
    FORMAT_VERSION,
    ColumnReader,
    as_byte_buffer,
    check_checksum,
    check_magic_version_size,
    with_checksum,
)
from spear_engine.replay.oracle_checks import float64_1d


class NumpyBaselineWindow:
    """Sliding window of float64 values with np.percentile (test oracle and benchmark baseline)."""

    def __init__(self, capacity: int = 0, eviction: str = "value"):
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0 (0 means unlimited), got {capacity}")
        if eviction not in BASELINE_EVICTIONS:
            raise ValueError(f"eviction must be 'value' or 'step_entries', got {eviction!r}")
        self._capacity = int(capacity)
        self._eviction = eviction
        self._values = np.empty(0, dtype=np.float64)
        self._entries: deque[list[int]] = deque()  # [step, number of its values still in the window]

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return (
            f"NumpyBaselineWindow(values={len(self)}, capacity={self._capacity}, eviction={self._eviction!r})"
        )

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def eviction(self) -> str:
        return self._eviction

    def values(self) -> np.ndarray:
        return self._values.copy()

    def clear(self) -> None:
        self._values = np.empty(0, dtype=np.float64)
        self._entries.clear()

    def push(self, step: int, values) -> None:
        values = float64_1d(values, "values")
        if np.isnan(values).any():
            raise ValueError("baseline values must not be NaN")
        values = values + 0.0  # a copy, with -0.0 turned into +0.0
        if self._eviction == "step_entries":
            self._evict_whole_entries()
        self._entries.append([int(step), len(values)])
        self._values = np.concatenate((self._values, values))
        if self._eviction == "value":
            self._evict_single_values()

    def _evict_whole_entries(self) -> None:
        """Official SPEAR: before a push, drop the oldest pushes while over capacity."""
        if self._capacity == 0:
            return
        dropped = 0
        while len(self._values) - dropped > self._capacity and self._entries:
            dropped += self._entries.popleft()[1]
        self._values = self._values[dropped:]

    def _evict_single_values(self) -> None:
        """After a push, drop the oldest values until the window fits."""
        if self._capacity == 0 or len(self._values) <= self._capacity:
            return
        excess = len(self._values) - self._capacity
        self._values = self._values[excess:]
        while excess > 0:
            oldest = self._entries[0]
            dropped = min(oldest[1], excess)
            oldest[1] -= dropped
            excess -= dropped
            if oldest[1] == 0:
                self._entries.popleft()

    def percentile(self, q: float) -> float:
        q = float(q)
        if not 0.0 <= q / 100 <= 1.0:
            raise ValueError(f"percentile q must be in [0, 100], got {q!r}")
        if len(self._values) == 0:
            raise ValueError("percentile of an empty baseline window")
        return float(np.percentile(self._values, q))

    def to_bytes(self) -> bytes:
        n_values, n_entries = len(self._values), len(self._entries)
        total = BASELINE_HEADER.size + 8 * n_values + 16 * n_entries + CHECKSUM.size
        header = BASELINE_HEADER.pack(
            BASELINE_MAGIC,
            FORMAT_VERSION,
            BASELINE_EVICTIONS.index(self._eviction),
            total,
            self._capacity,
            n_values,
            n_entries,
        )
        steps = np.array([e[0] for e in self._entries], dtype=np.int64)
        counts = np.array([e[1] for e in self._entries], dtype=np.uint64)
        return with_checksum([header, self._values.tobytes(), steps.tobytes(), counts.tobytes()])

    @classmethod
    def from_bytes(cls, data) -> NumpyBaselineWindow:
        what = "baseline window"
        buf = as_byte_buffer(data)
        check_magic_version_size(what, buf, BASELINE_MAGIC, BASELINE_HEADER.size)
        _, _, eviction, _, capacity, n_values, n_entries = BASELINE_HEADER.unpack_from(buf, 0)
        body = len(buf) - BASELINE_HEADER.size - CHECKSUM.size
        if 8 * n_values + 16 * n_entries != body:
            raise ValueError(f"{what} bytes are corrupted: the value and entry counts do not match the size")
        check_checksum(what, buf)
        reader = ColumnReader(buf, BASELINE_HEADER.size)
        values = reader.take(np.float64, n_values)
        steps = reader.take(np.int64, n_entries)
        counts = reader.take(np.uint64, n_entries)
        if eviction >= len(BASELINE_EVICTIONS):
            raise ValueError(f"{what} bytes hold an unknown eviction code {eviction}")
        if sum(int(c) for c in counts) != n_values:
            raise ValueError(f"{what} bytes are inconsistent: entry counts do not sum to the values")
        if np.isnan(values).any() or (np.signbit(values) & (values == 0.0)).any():
            raise ValueError(f"{what} bytes hold a NaN or -0.0 value")
        window = cls(capacity, BASELINE_EVICTIONS[eviction])
        window._values = values
        window._entries = deque([int(s), int(c)] for s, c in zip(steps, counts))
        return window
