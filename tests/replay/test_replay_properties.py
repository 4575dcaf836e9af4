"""Stateful property tests: random operation sequences on the C++ index and the numpy oracle.

Both receive exactly the same calls; every return value (or exception type) and the whole state
(metadata, row data, byte image, generator) must match bit for bit after every step.
"""

import math

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from replay_helpers import assert_same_state, outcome, same_outcome

from spear_engine.replay import BaselineWindow, NumpyBaselineWindow, NumpyReplayIndex, ReplayIndex

# Few distinct values, so ties (and -0.0 vs 0.0) are common; some are not multiples of 2**-20, so
# the integer score weights are rounded down.
SCORES = st.sampled_from([-1.0, -0.0, 0.0, 1e-7, 0.1, 0.25, 1 / 3, 0.5, 1.0, 2.7, 3.0, math.inf, -math.inf])
ADVANTAGES = st.sampled_from([-1.0, 0.0, 0.5, 2.0, math.nan])
THRESHOLDS = st.sampled_from([-math.inf, -0.5, 0.0, 0.5])
STEPS = st.integers(0, 12)

MACHINE_SETTINGS = settings(
    max_examples=300,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def call_both(cpp, ref, method: str, *args, **kwargs):
    a = outcome(lambda: getattr(cpp, method)(*args, **kwargs))
    b = outcome(lambda: getattr(ref, method)(*args, **kwargs))
    assert same_outcome(a, b), (method, args, kwargs, a, b)
    return a


class ReplayIndexMachine(RuleBasedStateMachine):
    @initialize(
        capacity=st.sampled_from([0, 1, 2, 5, 12]),
        eviction=st.sampled_from(["oldest", "lowest_score"]),
        seed=st.integers(0, 2**64 - 1),
        segment_tokens=st.sampled_from([1, 3, 8, 64, 1 << 20]),
        ascending_steps=st.booleans(),
        data=st.data(),
    )
    def start(self, capacity, eviction, seed, segment_tokens, ascending_steps, data):
        self.cpp = ReplayIndex(capacity, eviction, seed, segment_tokens)
        self.ref = NumpyReplayIndex(capacity, eviction, seed, segment_tokens)
        self.pinned = []  # (C++ view, copy of its data): views must never change
        # Steps that never decrease (as in training) take the C++ binary-search path of evict_stale.
        self.ascending_steps = ascending_steps
        self.newest_step = 0
        # Hypothesis switches random subsets of rules off per example; start with rows anyway.
        self._insert(data, data.draw(st.lists(st.integers(0, 9), min_size=1, max_size=12)), -math.inf)

    def _ids(self, data, extra_unknown=True):
        """A random list of row ids: live ones, dead ones and a few never seen."""
        pool = list(range(self.cpp.next_row_id + 2))
        if extra_unknown:
            pool += [-1, 10**6]
        return data.draw(st.lists(st.sampled_from(pool), max_size=6))

    def _steps(self, data, n):
        steps = np.array(data.draw(st.lists(STEPS, min_size=n, max_size=n)), dtype=np.int64)
        if self.ascending_steps:
            steps = self.newest_step + np.sort(steps) // 4
            self.newest_step = int(steps[-1]) if n else self.newest_step
        return steps

    def _insert(self, data, lengths, threshold):
        n = len(lengths)
        rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
        total = sum(lengths)
        batch = {
            "tokens": rng.integers(-(2**31), 2**31 - 1, total, dtype=np.int64).astype(np.int32),
            "logp": rng.standard_normal(total).astype(np.float32),
            "mask": rng.integers(0, 256, total).astype(np.uint8),
            "lengths": np.array(lengths, dtype=np.int64),
            "steps": self._steps(data, n),
            "group_ids": rng.integers(-3, 3, n),
            "traj_ids": rng.integers(0, 2**40, n),
            "scores": np.array(data.draw(st.lists(SCORES, min_size=n, max_size=n)), dtype=np.float64),
            "advantages": np.array(data.draw(st.lists(ADVANTAGES, min_size=n, max_size=n)), dtype=np.float64),
        }
        call_both(self.cpp, self.ref, "insert_batch", **batch, threshold=threshold)

    @rule(data=st.data(), lengths=st.lists(st.integers(0, 9), max_size=7), threshold=THRESHOLDS)
    def insert(self, data, lengths, threshold):
        self._insert(data, lengths, threshold)

    @rule(data=st.data(), lengths=st.lists(st.integers(0, 70), min_size=5, max_size=20))
    def insert_long_rows(self, data, lengths):
        # rows longer than small segments get segments of their own
        self._insert(data, lengths, -math.inf)

    @rule(data=st.data())
    def remove(self, data):
        call_both(self.cpp, self.ref, "remove", np.array(self._ids(data), dtype=np.int64))

    @rule(window=st.integers(-2, 8), current_step=st.one_of(st.none(), st.integers(0, 16)))
    def evict_stale(self, window, current_step):
        if current_step is not None:
            current_step += self.newest_step
        call_both(self.cpp, self.ref, "evict_stale", window, current_step)

    @rule()
    def flush(self):
        call_both(self.cpp, self.ref, "flush")

    @rule(threshold=st.sampled_from([-math.inf, -1.0, 0.0, 0.3, 1.0, math.inf]))
    def count_score_above(self, threshold):
        call_both(self.cpp, self.ref, "count_score_above", threshold)

    @rule(
        data=st.data(),
        k=st.integers(0, 8),
        weighting=st.sampled_from(["uniform", "score"]),
        use_candidates=st.booleans(),
        score_floor=st.sampled_from([0.0, -1.0, 0.75, -0.0, 0.3]),
    )
    def draw(self, data, k, weighting, use_candidates, score_floor):
        candidates = None
        if use_candidates:
            live = self.cpp.row_ids().tolist()
            candidates = np.array(data.draw(st.permutations(live))[: data.draw(st.integers(0, len(live)))])
        call_both(self.cpp, self.ref, "draw", k, weighting, candidates, score_floor)

    @rule(data=st.data())
    def draw_with_bad_candidates(self, data):
        # unknown ids (KeyError) or repeated ids (ValueError); the generator must not move
        ids = self._ids(data)
        call_both(self.cpp, self.ref, "draw", 2, "uniform", np.array(ids + ids[:1], dtype=np.int64))

    @rule(data=st.data(), pad_token=st.sampled_from([0, -1, 2**31 - 1]))
    def gather(self, data, pad_token):
        call_both(self.cpp, self.ref, "gather", np.array(self._ids(data), dtype=np.int64), pad_token)

    @precondition(lambda self: len(self.cpp) > 0)
    @rule(data=st.data())
    def views(self, data):
        row_id = data.draw(st.sampled_from(self.cpp.row_ids().tolist()))
        for method in ("tokens", "logp", "mask"):
            view = call_both(self.cpp, self.ref, method, row_id)
            self.pinned.append((getattr(self.cpp, method)(row_id), view.copy()))

    @rule(data=st.data())
    def views_of_unknown_rows(self, data):
        row_id = data.draw(st.sampled_from([-1, self.cpp.next_row_id, 10**9]))
        call_both(self.cpp, self.ref, "tokens", row_id)

    @rule(source=st.sampled_from(["own", "cross"]))
    def round_trip_bytes(self, source):
        cpp_bytes, ref_bytes = self.cpp.to_bytes(), self.ref.to_bytes()
        if source == "own":
            self.cpp, self.ref = ReplayIndex.from_bytes(cpp_bytes), NumpyReplayIndex.from_bytes(ref_bytes)
        else:  # a checkpoint written by one loads in the other
            self.cpp, self.ref = ReplayIndex.from_bytes(ref_bytes), NumpyReplayIndex.from_bytes(cpp_bytes)

    @invariant()
    def same_state(self):
        assert_same_state(self.cpp, self.ref)

    @invariant()
    def views_never_change(self):
        for view, expected in self.pinned:
            assert view.tobytes() == expected.tobytes()
            assert not view.flags.writeable

    @invariant()
    def capacity_holds(self):
        if self.cpp.capacity_rows:
            assert len(self.cpp) <= self.cpp.capacity_rows
        meta = self.cpp.metadata()
        assert int(meta["length"].sum()) == self.cpp.num_tokens
        assert (np.diff(meta["row_id"]) > 0).all()


ReplayIndexMachine.TestCase.settings = MACHINE_SETTINGS
TestReplayIndexAgainstOracle = ReplayIndexMachine.TestCase


BASELINE_VALUES = st.sampled_from([-2.0, -0.0, 0.0, 0.5, 1.0, 1.0, 3.25, 1e300, -1e-300, math.inf, -math.inf])


class BaselineWindowMachine(RuleBasedStateMachine):
    @initialize(
        capacity=st.sampled_from([0, 1, 3, 7]),
        eviction=st.sampled_from(["value", "step_entries"]),
        values=st.lists(BASELINE_VALUES, min_size=1, max_size=6),
    )
    def start(self, capacity, eviction, values):
        self.cpp = BaselineWindow(capacity, eviction)
        self.ref = NumpyBaselineWindow(capacity, eviction)
        call_both(self.cpp, self.ref, "push", 0, np.array(values))

    @rule(
        step=st.integers(-3, 20),
        values=st.lists(st.one_of(BASELINE_VALUES, st.floats(allow_nan=False)), max_size=5),
    )
    def push(self, step, values):
        call_both(self.cpp, self.ref, "push", step, np.array(values, dtype=np.float64))

    @rule(
        q=st.one_of(
            st.sampled_from([0.0, 100.0, 50.0, 25.0, 99.99, -0.0, -1e-9, 100.00000000000003]),
            st.floats(0, 100),
        )
    )
    def percentile(self, q):
        result = call_both(self.cpp, self.ref, "percentile", q)
        if not isinstance(result, type):
            assert same_outcome(result, float(np.percentile(self.cpp.values(), q)))

    @rule()
    def clear(self):
        call_both(self.cpp, self.ref, "clear")

    @rule(source=st.sampled_from(["own", "cross"]))
    def round_trip_bytes(self, source):
        cpp_bytes, ref_bytes = self.cpp.to_bytes(), self.ref.to_bytes()
        if source == "own":
            self.cpp, self.ref = (
                BaselineWindow.from_bytes(cpp_bytes),
                NumpyBaselineWindow.from_bytes(ref_bytes),
            )
        else:
            self.cpp, self.ref = (
                BaselineWindow.from_bytes(ref_bytes),
                NumpyBaselineWindow.from_bytes(cpp_bytes),
            )

    @invariant()
    def same_state(self):
        assert len(self.cpp) == len(self.ref)
        assert same_outcome(self.cpp.values(), self.ref.values())
        assert self.cpp.to_bytes() == self.ref.to_bytes()
        if self.cpp.capacity and self.cpp.eviction == "value":
            assert len(self.cpp) <= self.cpp.capacity


BaselineWindowMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestBaselineWindowAgainstOracle = BaselineWindowMachine.TestCase
