"""BaselineWindow: hand-computed eviction cases and numpy-exact percentiles (C++ and oracle)."""

import math
import struct
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from replay_helpers import IMPL_IDS, WINDOWS, same_float

from spear_engine.replay import BaselineWindow

parametrize_window = pytest.mark.parametrize("Window", WINDOWS, ids=IMPL_IDS)


@parametrize_window
def test_value_eviction_drops_oldest_values_after_the_push(Window):
    window = Window(capacity=4, eviction="value")
    window.push(0, [1.0, 2.0, 3.0])
    window.push(1, [4.0, 5.0])
    assert window.values().tolist() == [2.0, 3.0, 4.0, 5.0]
    window.push(2, [6.0, 7.0, 8.0, 9.0, 10.0])
    assert window.values().tolist() == [7.0, 8.0, 9.0, 10.0]
    assert len(window) == 4 and (window.capacity, window.eviction) == (4, "value")


@parametrize_window
def test_step_entries_eviction_drops_whole_pushes_before_appending(Window):
    window = Window(capacity=3, eviction="step_entries")
    window.push(0, [1.0, 2.0])
    window.push(1, [3.0, 4.0])  # 2 <= 3 before the push: nothing dropped, the window grows to 4
    assert window.values().tolist() == [1.0, 2.0, 3.0, 4.0]
    window.push(2, [5.0])  # 4 > 3: the step-0 entry goes (2 values), then 5 is appended
    assert window.values().tolist() == [3.0, 4.0, 5.0]
    window.push(3, [6.0, 7.0, 8.0, 9.0])  # 3 <= 3: nothing dropped
    assert len(window) == 7
    window.push(4, [])  # 7 > 3, then 5 > 3, then 4 > 3: the entries of steps 1, 2 and 3 all go
    assert window.values().tolist() == []
    window.push(5, [1.5])  # the empty entry of step 4 is still there: 0 <= 3, nothing to drop
    assert window.values().tolist() == [1.5]


@parametrize_window
def test_unlimited_capacity_and_clear(Window):
    window = Window()
    for step in range(5):
        window.push(step, np.arange(10.0))
    assert len(window) == 50
    window.clear()
    assert len(window) == 0 and window.values().tolist() == []
    with pytest.raises(ValueError):
        window.percentile(50)


@parametrize_window
def test_percentile_hand_computed(Window):
    window = Window()
    window.push(0, [4.0, 1.0, 3.0, 2.0])
    assert window.percentile(50) == 2.5  # virtual index 1.5 between 2 and 3
    assert window.percentile(0) == 1.0
    assert window.percentile(100) == 4.0
    assert window.percentile(25) == 1.75
    window.clear()
    window.push(0, [7.0])
    assert window.percentile(0) == window.percentile(37.5) == window.percentile(100) == 7.0


@parametrize_window
def test_negative_zero_is_stored_as_zero_and_nan_is_rejected(Window):
    window = Window()
    window.push(0, [-0.0])
    assert struct.pack("<d", window.values()[0]) == struct.pack("<d", 0.0)
    assert struct.pack("<d", window.percentile(50)) == struct.pack("<d", 0.0)
    with pytest.raises(ValueError):
        window.push(1, [1.0, math.nan])
    assert len(window) == 1


@parametrize_window
@pytest.mark.parametrize("q", [-1.0, 100.00000000000003, math.nan, math.inf])
def test_percentile_rejects_q_outside_0_100(Window, q):
    window = Window()
    window.push(0, [1.0])
    with pytest.raises(ValueError):
        window.percentile(q)


@parametrize_window
@pytest.mark.parametrize("kwargs", [{"capacity": -1}, {"eviction": "fifo"}])
def test_constructor_rejects_bad_arguments(Window, kwargs):
    with pytest.raises(ValueError):
        Window(**kwargs)


@parametrize_window
def test_push_rejects_bad_values(Window):
    window = Window()
    with pytest.raises(ValueError):
        window.push(0, np.zeros((2, 2)))
    with pytest.raises(ValueError):
        window.push(0, ["a"])
    window.push(0, np.array([1, 2], dtype=np.int32))  # integers are real numbers
    assert window.values().dtype == np.float64


@parametrize_window
def test_byte_layout_by_hand(Window):
    window = Window(capacity=5, eviction="step_entries")
    window.push(3, [1.5, -2.0])
    window.push(-1, [])
    total = 48 + 2 * 8 + 2 * 16 + 4
    body = (
        b"SPEARBLW"
        + struct.pack("<IIQQQQ", 1, 1, total, 5, 2, 2)
        + struct.pack("<dd", 1.5, -2.0)
        + struct.pack("<qq", 3, -1)
        + struct.pack("<QQ", 2, 0)
    )
    data = window.to_bytes()
    assert data == body + struct.pack("<I", zlib.crc32(body))
    assert Window.from_bytes(data).to_bytes() == data


@parametrize_window
def test_from_bytes_rejects_corruption(Window):
    window = Window(capacity=5)
    window.push(0, [1.0, 2.0, 3.0])
    data = window.to_bytes()
    for position in range(len(data)):
        corrupted = bytearray(data)
        corrupted[position] ^= 0x10
        with pytest.raises(ValueError):
            Window.from_bytes(bytes(corrupted))
    for size in (0, 10, 51, len(data) - 1):
        with pytest.raises(ValueError):
            Window.from_bytes(data[:size])
    with pytest.raises(ValueError):
        Window.from_bytes(data + b"\0")


def _reseal(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


@parametrize_window
def test_from_bytes_rejects_inconsistent_content_with_a_valid_checksum(Window):
    window = Window()
    window.push(0, [1.0, 2.0])
    body = bytearray(window.to_bytes()[:-4])
    bad_eviction = bytearray(body)
    bad_eviction[12] = 7
    bad_counts = bytearray(body)
    bad_counts[-8:] = struct.pack("<Q", 3)
    negative_zero = bytearray(body)
    negative_zero[48:56] = struct.pack("<d", -0.0)
    bad_version = bytearray(body)
    bad_version[8] = 2
    for case in (bad_eviction, bad_counts, negative_zero, bad_version):
        with pytest.raises(ValueError):
            Window.from_bytes(_reseal(bytes(case)))


# ---------------------------------------------------------------------------------------------
# percentile == np.percentile, bit for bit

VALUES = st.lists(
    st.one_of(
        st.sampled_from([0.0, 1.0, -1.0, 2.5, 1e-300, 1e300, -0.0]),  # duplicates and extremes
        st.floats(allow_nan=False, allow_infinity=False, width=64),
        st.floats(-10, 10),
    ),
    min_size=1,
    max_size=60,
)
QS = st.one_of(st.sampled_from([0.0, 100.0, 50.0, 25.0, 75.0, 1e-12, 99.999999]), st.floats(0, 100))


@settings(max_examples=300, deadline=None)
@given(values=VALUES, qs=st.lists(QS, min_size=1, max_size=6), pushes=st.integers(1, 4))
def test_percentile_matches_numpy_bit_for_bit(values, qs, pushes):
    window = BaselineWindow()
    for chunk in np.array_split(np.array(values), pushes):
        window.push(0, chunk)
    stored = np.array(values) + 0.0  # the window keeps -0.0 as +0.0
    for q in qs:
        assert same_float(window.percentile(q), float(np.percentile(stored, q)))


@settings(max_examples=50, deadline=None)
@given(data=st.data(), capacity=st.integers(1, 40), eviction=st.sampled_from(["value", "step_entries"]))
def test_percentile_tracks_numpy_through_evictions(data, capacity, eviction):
    window = BaselineWindow(capacity, eviction)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    for step in range(data.draw(st.integers(1, 15))):
        window.push(step, rng.integers(-5, 5, rng.integers(0, 12)) * 0.5)  # many duplicates
        if len(window):
            q = data.draw(QS)
            assert same_float(window.percentile(q), float(np.percentile(window.values(), q)))


def test_percentile_of_large_window_matches_numpy():
    rng = np.random.default_rng(7)
    values = np.round(rng.standard_normal(200_000), 3)  # lots of ties
    window = BaselineWindow(capacity=150_000, eviction="value")
    for step, chunk in enumerate(np.array_split(values, 20)):
        window.push(step, chunk)
    kept = values[-150_000:] + 0.0  # round() makes some -0.0, which the window stores as +0.0
    assert window.values().tobytes() == kept.tobytes()
    for q in np.concatenate([[0.0, 100.0, 50.0], rng.uniform(0, 100, 50)]):
        assert same_float(window.percentile(q), float(np.percentile(kept, q)))
