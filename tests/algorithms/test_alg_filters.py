"""filters: the four Dr.BoT response filters and the group-std rollout filter."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spear_engine.algorithms.filters import (
    apply_response_filters,
    compute_response_flags,
    filter_rollout_by_group_std,
    group_score_stats,
    has_repeated_ngrams,
    is_incomplete,
    is_overlong,
    is_think_action_valid,
    is_unreadable,
)


# --------------------------------------------------------------------------------------------
# response flags
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "valid"),
    [
        (None, False),
        ("", False),
        ("   \n\t", False),
        ("<think>I should look around</think>", False),  # <think> without an action
        ("<think>plan</think>\n<action>go to desk 1</action>", True),
        ("<action>open drawer 2</action>", True),  # <think> is not required
        ("<action>take key</action><think>second thoughts</think>", False),  # action before the last </think>
        ("<think>a</think><action>x</action><think>b</think> <action>y</action>", True),
        ("<think>a</think><action>multi\nline</action>", True),
        ("<think>a</think><action></action>", True),  # an empty action still parses
        ("<think>a</think><action>unclosed", False),
        ("<think>a</think>action: go", False),
    ],
)
def test_think_action_validity(text, valid):
    assert is_think_action_valid(text) is valid
    assert is_incomplete(text) is (not valid)


def test_repeated_ngrams_counts_overlapping_windows():
    assert has_repeated_ngrams([1] * 29)  # the all-ones 20-gram occurs 29 - 20 + 1 = 10 times
    assert not has_repeated_ngrams([1] * 28)  # 9 times
    period = list(range(20))
    assert has_repeated_ngrams(period * 10)  # each 20-gram starting at offset 0 occurs 10 times
    assert not has_repeated_ngrams(period * 9 + period[:19])
    assert not has_repeated_ngrams([7] * 19, n=20, threshold=1)  # shorter than n: nothing repeats
    assert has_repeated_ngrams(torch.tensor([4, 5, 4, 5, 4]), n=2, threshold=2)
    assert not has_repeated_ngrams(np.array([4, 5, 6, 7]), n=2, threshold=2)
    with pytest.raises(ValueError):
        has_repeated_ngrams([1, 2], n=0)


def test_unreadable_and_overlong():
    assert is_unreadable("bad \ufffd byte")
    assert is_unreadable("mojibake ï¿½ here")
    assert is_unreadable("fullwidth ï¼Ÿ question")
    assert not is_unreadable("<action>go to desk 1</action> ¿Qué?")
    assert not is_unreadable(None)
    assert is_overlong(512, 512) and not is_overlong(511, 512)
    assert not is_overlong(16383) and is_overlong(16384)


def test_compute_response_flags():
    ids = [[1, 2, 3], [5] * 40, list(range(512)), []]
    texts = ["<action>a</action>", "<think>x</think>", "<action>b\ufffd</action>", ""]
    flags = compute_response_flags(ids, texts, max_response_len=512)
    assert flags["is_incomplete"].tolist() == [False, True, False, True]
    assert flags["is_overlong"].tolist() == [False, False, True, False]
    assert flags["is_repetitive"].tolist() == [False, True, False, False]
    assert flags["is_unreadable"].tolist() == [False, False, True, False]
    with pytest.raises(ValueError):
        compute_response_flags(ids, texts[:2])


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32, torch.int64])
def test_apply_response_filters(dtype):
    mask = torch.ones(5, 3, dtype=dtype)
    mask[4, 2] = 0
    original = mask.clone()
    out, metrics = apply_response_filters(
        mask,
        is_incomplete=[1, 0, 0, 1, 0],
        is_overlong=np.array([False, False, True, True, False]),
        is_unreadable=torch.tensor([False, False, False, False, False]),
    )
    assert out.dtype == dtype and torch.equal(mask, original)
    assert out.sum(-1).tolist() == [0, 3, 0, 0, 2]
    # counts per enabled filter, overlaps counted in each; the repetitive filter is disabled
    assert metrics == {"incomplete_responses": 2, "overlong_responses": 2, "unreadableBPE_responses": 0}
    assert list(metrics) == ["incomplete_responses", "overlong_responses", "unreadableBPE_responses"]
    with pytest.raises(ValueError):
        apply_response_filters(mask, is_repetitive=[True, False])
    untouched, none = apply_response_filters(mask)
    assert torch.equal(untouched, mask) and none == {}


# --------------------------------------------------------------------------------------------
# group-std rollout filter
# --------------------------------------------------------------------------------------------
# rows: (uid, traj, score). Groups: g1 traj means [2, 0] -> mu 1, sigma 1; g2 [5, 5] -> 5, 0;
# g3 [4, 0, 2] -> 2, sqrt(8/3); g4 [1, 3] -> 2, 1 (ties g1 on sigma)
ROWS = [
    ("g1", "t1", 1.0),
    ("g2", "t3", 5.0),
    ("g1", "t1", 3.0),
    ("g3", "t5", 2.0),
    ("g4", "t8", 1.0),
    ("g3", "t5", 6.0),
    ("g1", "t2", 0.0),
    ("g2", "t4", 5.0),
    ("g3", "t6", 0.0),
    ("g4", "t9", 3.0),
    ("g3", "t7", 2.0),
]
UIDS = np.array([r[0] for r in ROWS], dtype=object)
TRAJS = np.array([r[1] for r in ROWS], dtype=object)
SCORES = torch.tensor([r[2] for r in ROWS])
S3 = math.sqrt(8 / 3)


def test_group_score_stats_by_hand():
    uids, means, stds = group_score_stats(SCORES, UIDS, TRAJS)
    assert uids == ["g1", "g2", "g3", "g4"]
    assert means.tolist() == pytest.approx([1.0, 5.0, 2.0, 2.0])
    assert stds.tolist() == pytest.approx([1.0, 0.0, S3, 1.0])


def test_ratio_one_keeps_everything_and_logs_metrics():
    kept, metrics = filter_rollout_by_group_std(SCORES, UIDS, TRAJS, 1.0, pow2_subsample=True, rng=0)
    assert kept.tolist() == list(range(len(ROWS)))
    assert metrics["rollout/in_group_std"] == pytest.approx((1 + 0 + S3 + 1) / 4)
    assert metrics["rollout/in_group_max"] == 5.0
    assert metrics["rollout/in_group_mean"] == pytest.approx(2.5)
    for k in ("std", "max", "mean"):
        assert metrics[f"rollout/chosen_in_group_{k}"] == metrics[f"rollout/in_group_{k}"]


def test_std_keeps_largest_groups_with_stable_ties():
    kept, metrics = filter_rollout_by_group_std(SCORES, UIDS, TRAJS, 0.5, "std")
    # K = 2: g3 (sqrt(8/3)), then g1 before g4 (tie at 1, first seen wins)
    assert kept.tolist() == [0, 2, 3, 5, 6, 8, 10]
    assert metrics["rollout/chosen_in_group_std"] == pytest.approx((S3 + 1) / 2)
    assert metrics["rollout/chosen_in_group_max"] == 2.0
    assert metrics["rollout/chosen_in_group_mean"] == pytest.approx(1.5)
    kept, _ = filter_rollout_by_group_std(SCORES, UIDS, TRAJS, 0.75, "std")  # K = floor(3.0) = 3
    assert kept.tolist() == [0, 2, 3, 4, 5, 6, 8, 9, 10]


def test_std_rev_keeps_smallest_groups():
    kept, metrics = filter_rollout_by_group_std(SCORES, UIDS, TRAJS, 0.5, "std_rev")
    assert kept.tolist() == [0, 1, 2, 6, 7]  # g2 (sigma 0) and g1 (first of the sigma-1 tie)
    assert metrics["rollout/chosen_in_group_std"] == pytest.approx(0.5)
    assert metrics["rollout/chosen_in_group_max"] == 5.0


def test_two_dimensional_reward_tensor_and_errors():
    rewards = torch.zeros(len(ROWS), 3)
    rewards[:, 1] = SCORES
    kept, _ = filter_rollout_by_group_std(rewards, UIDS, TRAJS, 0.5)
    assert kept.tolist() == [0, 2, 3, 5, 6, 8, 10]
    with pytest.raises(ValueError):
        filter_rollout_by_group_std(SCORES, UIDS, TRAJS, 0.2)  # floor(0.8) = 0 groups
    with pytest.raises(ValueError):
        filter_rollout_by_group_std(SCORES, UIDS, TRAJS, 0.5, "max")
    with pytest.raises(ValueError):
        filter_rollout_by_group_std(SCORES, UIDS, TRAJS, 1.5)
    with pytest.raises(ValueError):
        filter_rollout_by_group_std(SCORES[:0], UIDS[:0], TRAJS[:0], 0.5)
    with pytest.raises(ValueError):
        group_score_stats(SCORES, UIDS[:3], TRAJS)


def test_pow2_subsample():
    kept_all, _ = filter_rollout_by_group_std(SCORES, UIDS, TRAJS, 0.5)
    draws = [
        filter_rollout_by_group_std(SCORES, UIDS, TRAJS, 0.5, pow2_subsample=True, rng=s)[0]
        for s in range(20)
    ]
    for d in draws:
        assert len(d) == 4 and set(d) <= set(kept_all) and d.tolist() == sorted(d.tolist())
    assert len({tuple(d) for d in draws}) > 1  # actually random
    same = filter_rollout_by_group_std(
        SCORES, UIDS, TRAJS, 0.5, pow2_subsample=True, rng=np.random.default_rng(3)
    )[0]
    assert same.tolist() == draws[3].tolist()  # seeded: reproducible


def test_pow2_subsample_of_one_sample_keeps_none():
    scores = torch.tensor([1.0, 0.0, 1.0])
    uids = np.array(["solo", "pair", "pair"], dtype=object)
    trajs = np.array(["a", "b", "c"], dtype=object)
    kept, _ = filter_rollout_by_group_std(scores, uids, trajs, 0.5, "std_rev")
    assert kept.tolist() == [0]
    kept, _ = filter_rollout_by_group_std(scores, uids, trajs, 0.5, "std_rev", pow2_subsample=True, rng=0)
    assert kept.tolist() == []  # the official n <= 1 quirk: 2^floor(log2 n) becomes -1, slicing [:-1]


def _reference_filter(scores, uids, trajs, ratio, kind):
    """Straightforward restatement of the group-std rollout filter (docs/algorithm.md; no pow2 step)."""
    order = list(dict.fromkeys(uids))
    stats = {}
    for g in order:
        traj_order = list(dict.fromkeys(t for u, t in zip(uids, trajs) if u == g))
        means = [
            statistics.fmean([s for s, u, t in zip(scores, uids, trajs) if u == g and t == tr])
            for tr in traj_order
        ]
        stats[g] = (statistics.fmean(means), statistics.pstdev(means))
    k = int(ratio * len(order))
    ranked = sorted(order, key=lambda g: -stats[g][1] if kind == "std" else stats[g][1])
    chosen = set(ranked[:k])
    return [i for i, u in enumerate(uids) if u in chosen]


@settings(max_examples=40, deadline=None)
@given(
    data=st.lists(
        st.tuples(st.integers(0, 5), st.integers(0, 1), st.sampled_from([0.0, 1.0, 2.0, 10.0])),
        min_size=1,
        max_size=40,
    ),
    ratio=st.sampled_from([0.25, 0.5, 0.75]),
    kind=st.sampled_from(["std", "std_rev"]),
)
def test_property_filter_matches_reference(data, ratio, kind):
    # two trajectories per group and integer scores: equal spreads are bitwise equal in any summation
    # order, so tie-breaking is comparable between the two implementations
    uids = [f"u{g}" for g, _, _ in data]
    trajs = [f"u{g}-t{t}" for g, t, _ in data]
    scores = [s for _, _, s in data]
    if int(ratio * len(set(uids))) == 0:
        with pytest.raises(ValueError):
            filter_rollout_by_group_std(scores, uids, trajs, ratio, kind)
        return
    kept, _ = filter_rollout_by_group_std(np.array(scores), uids, trajs, ratio, kind)
    assert kept.tolist() == _reference_filter(scores, uids, trajs, ratio, kind)
