"""The byte format of ``ReplayIndex`` / ``BaselineWindow`` state (docs/replay_index_spec.md, "Byte formats").

One statement in Python of what ``csrc/replay_index.cpp`` writes and reads: magics, version, headers,
column order and dtypes, the CRC32 trailer, and the consistency rules a loaded state must meet. The
numpy oracle (:mod:`spear_engine.replay.oracle`, :mod:`spear_engine.replay.oracle_window`) writes and
reads through it; anything else that needs to look inside saved bytes should too. Needs only the
standard library and numpy.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

FORMAT_VERSION = 1
INDEX_MAGIC = b"SPEARRIX"
BASELINE_MAGIC = b"SPEARBLW"
# magic, version, eviction, total bytes, capacity_rows, seed, segment_tokens, next_row_id,
# rng state (4 words), n_rows, n_tokens
INDEX_HEADER = struct.Struct("<8sIIQqQqq4QQQ")
# magic, version, eviction, total bytes, capacity, n_values, n_entries
BASELINE_HEADER = struct.Struct("<8sIIQQQQ")
CHECKSUM = struct.Struct("<I")

META_COLUMNS = (
    ("row_id", np.int64),
    ("step", np.int64),
    ("group_id", np.int64),
    ("traj_id", np.int64),
    ("score", np.float64),
    ("advantage", np.float64),
    ("length", np.int32),
)
"""Per-row metadata, one column after the other in this order, after the index header."""
DATA_COLUMNS = (("tokens", np.int32), ("logp", np.float32), ("mask", np.uint8))
"""Per-token data of all rows (row-id order), one column after the other, after the metadata."""
ROW_METADATA_BYTES = 6 * 8 + 4
TOKEN_BYTES = 4 + 4 + 1

EVICTIONS = ("oldest", "lowest_score")
"""Index eviction names; the header stores the position."""
BASELINE_EVICTIONS = ("value", "step_entries")
"""Baseline-window eviction names; the header stores the position."""
MAX_SEGMENT_TOKENS = 2**31 - 1


def as_byte_buffer(data) -> memoryview:
    view = memoryview(data)
    if view.ndim != 1 or view.itemsize != 1 or not view.c_contiguous:
        raise ValueError("from_bytes expects bytes (a contiguous byte buffer)")
    return view


def check_magic_version_size(what: str, buf: memoryview, magic: bytes, header_bytes: int) -> None:
    minimum = header_bytes + CHECKSUM.size
    if len(buf) < minimum:
        raise ValueError(
            f"{what} bytes are truncated: got {len(buf)} bytes, the header and checksum alone take {minimum}"
        )
    if bytes(buf[:8]) != magic:
        raise ValueError(f"{what} bytes do not start with the magic {magic.decode()!r}")
    (version,) = struct.unpack_from("<I", buf, 8)
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{what} format version {version} is not supported (this build reads version {FORMAT_VERSION})"
        )
    (declared,) = struct.unpack_from("<Q", buf, 16)
    if declared != len(buf):
        raise ValueError(
            f"{what} bytes are truncated or padded: the header declares {declared} bytes, got {len(buf)}"
        )


def check_checksum(what: str, buf: memoryview) -> None:
    (stored,) = CHECKSUM.unpack_from(buf, len(buf) - CHECKSUM.size)
    computed = zlib.crc32(buf[: len(buf) - CHECKSUM.size])
    if stored != computed:
        raise ValueError(f"{what} bytes are corrupted: CRC32 mismatch (stored {stored}, computed {computed})")


def with_checksum(parts: list[bytes]) -> bytes:
    body = b"".join(parts)
    return body + CHECKSUM.pack(zlib.crc32(body))


class ColumnReader:
    """Reads consecutive little-endian arrays out of a byte buffer (copies, so the input can go)."""

    def __init__(self, buf: memoryview, offset: int) -> None:
        self._buf = buf
        self._offset = offset

    def take(self, dtype, count: int) -> np.ndarray:
        array = np.frombuffer(self._buf, dtype=dtype, count=count, offset=self._offset).copy()
        self._offset += array.nbytes
        return array


# ---------------------------------------------------------------------------------------------
# consistency of a loaded index: each returns "" when fine, else what is wrong


def config_problem(eviction: int, capacity_rows: int, segment_tokens: int) -> str:
    if eviction >= len(EVICTIONS):
        return f"unknown eviction code {eviction}"
    if capacity_rows < 0:
        return f"negative capacity_rows {capacity_rows}"
    if not 1 <= segment_tokens <= MAX_SEGMENT_TOKENS:
        return f"segment_tokens {segment_tokens} is out of range"
    return ""


def lengths_problem(lengths: np.ndarray, n_tokens: int) -> str:
    if len(lengths) and lengths.min() < 0:
        return f"negative row length {int(lengths.min())}"
    total = int(lengths.astype(np.int64).sum())
    if total != n_tokens:
        return f"row lengths sum to {total} but the header says {n_tokens} tokens"
    return ""


def rows_problem(meta: dict[str, np.ndarray], capacity_rows: int, next_row_id: int, rng_state) -> str:
    ids = meta["row_id"]
    if next_row_id < 0:
        return f"negative next row id {next_row_id}"
    if len(ids) and (ids[0] < 0 or ids[-1] >= next_row_id or (np.diff(ids) <= 0).any()):
        return "row ids must increase strictly within [0, next row id)"
    if np.isnan(meta["score"]).any():
        return "a row has a NaN score"
    if capacity_rows > 0 and len(ids) > capacity_rows:
        return f"{len(ids)} rows exceed capacity_rows {capacity_rows}"
    if not any(rng_state):
        return "the RNG state is all zero"
    return ""
