"""The SPEAR replay policy (docs/algorithm.md) on hand-computed cases, on both index implementations."""

from __future__ import annotations

import numpy as np
import pytest

from spear_engine.algorithms.self_imitation import (
    MASK_ATTENTION,
    MASK_RESPONSE,
    SelfImitation,
    SILBatch,
    largest_power_of_two_at_most,
    trajectory_mean_scores,
)
from spear_engine.config import AlgorithmConfig, ReplayConfig
from spear_engine.replay import BaselineWindow, NumpyBaselineWindow, NumpyReplayIndex, ReplayIndex

IMPLEMENTATIONS = {
    "cpp": (ReplayIndex, BaselineWindow),
    "numpy": (NumpyReplayIndex, NumpyBaselineWindow),
}
BOTH = (MASK_ATTENTION | MASK_RESPONSE)


def make_batch(
    scores: list[float],
    advantages: list[float],
    group_ids: list[int] | None = None,
    traj_ids: list[int] | None = None,
    length: int = 3,
    filtered: list[bool] | None = None,
    episode_advantages: list[float] | None = None,
) -> SILBatch:
    """n rows of ``length`` tokens; a filtered row keeps its attention bit but loses the response bit."""
    n = len(scores)
    group_ids = group_ids if group_ids is not None else list(range(n))
    traj_ids = traj_ids if traj_ids is not None else list(range(n))
    filtered = filtered if filtered is not None else [False] * n
    mask = np.concatenate([np.full(length, MASK_ATTENTION if f else BOTH, dtype=np.uint8) for f in filtered])
    return SILBatch(
        tokens=np.arange(n * length, dtype=np.int32),
        logp=-np.linspace(0.1, 1.0, n * length, dtype=np.float32),
        mask=mask,
        lengths=np.full(n, length, dtype=np.int32),
        group_ids=np.array(group_ids),
        traj_ids=np.array(traj_ids),
        scores=np.array(scores, dtype=np.float64),
        advantages=np.array(advantages, dtype=np.float64),
        episode_advantages=None if episode_advantages is None else np.array(episode_advantages),
    )


def official(**overrides) -> ReplayConfig:
    base = dict(
        enable_trajectory_replay=True,
        trajectory_buffer_size=4,
        trajectory_tolerate_steps=5,
        tolerate_steps_cap=10,
        staleness_anchor="newest_row",
        baseline_unit="group_mean",
        baseline_eviction="step_entries",
        admission_level="step",
        recalibration_keep="nonnegative",
        replay_trigger="when_full_then_flush",
        replay_mask="attention",
        weight_decay_trajectory_replay=-1.0,
    )
    base.update(overrides)
    return ReplayConfig(**base)


def make_sil(impl: str, replay: ReplayConfig, norm_std: bool = False, seed: int = 0, **kwargs) -> SelfImitation:
    index_cls, window_cls = IMPLEMENTATIONS[impl]
    algorithm = AlgorithmConfig(norm_adv_by_std_in_grpo=norm_std)
    return SelfImitation(replay, algorithm, seed=seed, index_factory=index_cls, window_factory=window_cls, **kwargs)


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
def impl(request) -> str:
    return request.param


def test_trajectory_mean_scores_by_hand() -> None:
    # traj 4 has step scores [1, 3] -> 2; traj 1 has [0] -> 0; traj 2 has [5, 6, 7] -> 6 (first-seen order)
    scores = np.array([1.0, 0.0, 3.0, 5.0, 6.0, 7.0])
    trajs = np.array([4, 1, 4, 2, 2, 2])
    assert trajectory_mean_scores(scores, trajs).tolist() == [2.0, 0.0, 6.0]


def test_power_of_two() -> None:
    assert [largest_power_of_two_at_most(n) for n in (1, 2, 3, 4, 7, 8, 9, 2047, 2048, 3000)] == [
        1, 2, 2, 4, 4, 8, 8, 1024, 2048, 2048,
    ]  # fmt: skip


def test_admission_is_strictly_positive_advantage_and_skips_filtered_rows(impl: str) -> None:
    sil = make_sil(impl, official())
    batch = make_batch(
        scores=[1, 0, 1, 1],
        advantages=[0.5, -0.5, 0.0, 0.7],
        filtered=[False, False, False, True],
    )
    metrics = sil.update(step=1, batch=batch)
    meta = sil.index.metadata()
    assert meta["score"].tolist() == [1.0]  # only row 0: row 2 has A == 0, row 3 is filtered
    assert metrics["replay/admitted_rows"] == 1.0 and metrics["trajectory_sft_buffersize"] == 1.0


def test_trajectory_level_admission_uses_episode_advantage(impl: str) -> None:
    sil = make_sil(impl, official(admission_level="trajectory"))
    # traj 0 (rows 0-1): step advantages [-0.2, 0.9], episode part [0.3, 0.3] -> admitted as a whole;
    # traj 1 (rows 2-3): step advantages [0.4, 0.4] (a GiGPO step bonus), episode part [-0.3, -0.3] -> rejected
    batch = make_batch(
        scores=[1, 1, 0, 0],
        advantages=[-0.2, 0.9, 0.4, 0.4],
        group_ids=[0, 0, 0, 0],
        traj_ids=[0, 0, 1, 1],
        episode_advantages=[0.3, 0.3, -0.3, -0.3],
    )
    sil.update(step=1, batch=batch)
    assert sil.index.metadata()["traj_id"].tolist() == [0, 0]


def test_baseline_windows_receive_group_means_and_stds(impl: str) -> None:
    sil = make_sil(impl, official())
    batch = make_batch(scores=[1, 3, 0, 5], advantages=[0, 0, 0, 0], group_ids=[0, 0, 0, 1], traj_ids=[0, 0, 1, 2])
    sil.update(step=1, batch=batch)
    assert sil.mean_window.values().tolist() == [1.0, 5.0]  # group 0: trajs (2, 0) -> 1; group 1: 5
    assert sil.std_window.values().tolist() == [1.0, 0.0]
    assert sil.baseline() == (3.0, 0.5)


def test_trajectory_baseline_unit_pushes_trajectory_returns(impl: str) -> None:
    sil = make_sil(impl, official(baseline_unit="trajectory", baseline_eviction="fifo", baseline_buffer_size=2))
    batch = make_batch(scores=[1, 3, 0, 5], advantages=[0, 0, 0, 0], group_ids=[0, 0, 0, 1], traj_ids=[0, 0, 1, 2])
    sil.update(step=1, batch=batch)
    assert sil.mean_window.values().tolist() == [0.0, 5.0]  # FIFO of 2 keeps the last two trajectory returns


def test_staleness_from_newest_row_with_official_cap(impl: str) -> None:
    sil = make_sil(impl, official(trajectory_tolerate_steps=15, tolerate_steps_cap=10))
    for step in range(1, 14):
        sil.update(step=step, batch=make_batch(scores=[1.0], advantages=[1.0]))
    # before admitting step 13's row the sweep keeps |step - 12| <= 10, i.e. steps 2..12; then 13 joins
    assert sil.index.metadata()["step"].tolist() == list(range(2, 14))


def test_staleness_from_current_step_without_cap(impl: str) -> None:
    sil = make_sil(impl, official(trajectory_tolerate_steps=3, tolerate_steps_cap=None, staleness_anchor="current_step"))
    sil.update(step=1, batch=make_batch(scores=[1.0], advantages=[1.0]))
    sil.update(step=2, batch=make_batch(scores=[1.0], advantages=[1.0]))
    sil.update(step=6, batch=make_batch(scores=[1.0], advantages=[1.0]))  # 6 - 1 > 3 and 6 - 2 > 3
    assert sil.index.metadata()["step"].tolist() == [6]


def fill(sil: SelfImitation, step: int, scores: list[float]) -> None:
    sil.update(step=step, batch=make_batch(scores=scores, advantages=[1.0] * len(scores)))


def test_official_trigger_fires_above_one_and_a_half_n_then_flushes(impl: str) -> None:
    sil = make_sil(impl, official(trajectory_buffer_size=4))
    fill(sil, 1, [0.0, 1.0, 2.0, 3.0, 4.0, 5.0])  # group means = the scores (one row per group); P50 = 2.5
    assert sil.qualifying_rows() == 3  # 3, 4, 5 beat 2.5
    batch, metrics = sil.draw(step=2, on_policy_rows=10)
    assert batch is None and metrics["replay/fired"] == 0.0 and len(sil) == 6
    fill(sil, 2, [6.0, 7.0, 8.0, 9.0])  # P50 over [0..9] = 4.5; qualifying: 5..9 -> 5 rows, and 6 <= 1.5 * 4
    assert sil.qualifying_rows() == 5
    assert sil.draw(step=3, on_policy_rows=10)[0] is None
    fill(sil, 3, [10.0, 11.0])  # P50 over [0..11] = 5.5; qualifying 6..11 -> 6 rows: still not > 6
    assert sil.draw(step=4, on_policy_rows=10)[0] is None
    fill(sil, 4, [12.0])  # P50 over [0..12] = 6; qualifying 7..12 -> 6 rows, not > 6
    assert sil.qualifying_rows() == 6
    fill(sil, 5, [13.0])  # P50 over [0..13] = 6.5; qualifying 7..13 -> 7 rows > 6: fires
    batch, metrics = sil.draw(step=6, on_policy_rows=10)
    assert metrics["replay/fired"] == 1.0 and batch is not None
    # kept rows: recalibrated A = score - 6.5 >= 0 -> scores 7..13 (7 rows); k = min(4, 4) = 4
    assert metrics["replay/eligible_rows"] == 7.0 and len(batch) == 4
    assert set(batch.scores.tolist()) <= set(range(7, 14))
    np.testing.assert_array_equal(batch.advantages, batch.scores - 6.5)
    assert len(sil) == 0 and len(sil.mean_window) == 14  # buffer flushed, baseline history kept


def test_official_recalibration_keeps_ties_and_spear_drops_them(impl: str) -> None:
    for keep in ("nonnegative", "positive"):
        sil = make_sil(impl, official(trajectory_buffer_size=1, recalibration_keep=keep))
        fill(sil, 1, [0.0, 1.0, 2.0])  # P50 = 1; qualifying rows: score 2 only -> 1 > 1.5? no
        fill(sil, 2, [1.0, 3.0])  # P50 over [0, 1, 2, 1, 3] = 1; qualifying: 2 and 3 -> 2 > 1.5: fires
        _, metrics = sil.draw(step=3, on_policy_rows=4)
        # rows 0,1,2,1,3 recalibrated: -1, 0, 1, 0, 2 -> nonnegative keeps 4 rows, positive keeps 2
        assert metrics["replay/eligible_rows"] == {"nonnegative": 4.0, "positive": 2.0}[keep]


def test_std_normalised_recalibration(impl: str) -> None:
    sil = make_sil(impl, official(trajectory_buffer_size=1), norm_std=True)
    sil.update(step=1, batch=make_batch(scores=[0, 2, 4, 10], advantages=[1, 1, 1, 1], group_ids=[0, 0, 1, 1], traj_ids=[0, 1, 2, 3]))
    # group means [1, 7] -> P50 4; group stds [1, 3] -> P50 2
    scores = np.array([0.0, 2.0, 4.0, 10.0])
    np.testing.assert_allclose(sil.recalibrated_advantages(scores, scores), (scores - 4.0) / (2.0 + 1e-6), rtol=0, atol=0)


def test_decay_mode_scales_stored_advantages_without_filtering(impl: str) -> None:
    sil = make_sil(impl, official(trajectory_buffer_size=2, weight_decay_trajectory_replay=0.5))
    sil.update(step=1, batch=make_batch(scores=[1, 2, 3, 4, 5], advantages=[0.2, 0.4, -0.6, 0.8, 0.6]))
    assert len(sil) == 4 and sil.qualifying_rows() == 4  # decay mode counts every stored row: 4 > 1.5 * 2
    batch, metrics = sil.draw(step=2, on_policy_rows=4)
    assert metrics["replay/eligible_rows"] == 4.0 and len(batch) == 2
    stored = {1.0: 0.2, 2.0: 0.4, 4.0: 0.8, 5.0: 0.6}
    np.testing.assert_array_equal(batch.advantages, [0.5 * stored[s] for s in batch.scores.tolist()])


def test_replay_smaller_than_world_size_is_dropped_but_buffer_still_flushed(impl: str) -> None:
    sil = make_sil(impl, official(trajectory_buffer_size=1), min_replay_rows=4)
    fill(sil, 1, [0.0, 1.0, 2.0, 3.0])  # P50 1.5: qualifying 2 > 1.5
    batch, metrics = sil.draw(step=2, on_policy_rows=4)
    assert batch is None and metrics["replay/fired"] == 1.0 and len(sil) == 0


def test_every_step_draw_keeps_the_buffer_and_caps_the_batch(impl: str) -> None:
    cfg = official(
        replay_trigger="every_step", trajectory_buffer_size=8, replay_batch_ratio=0.5,
        recalibration_keep="positive", capacity_rows=100,
    )  # fmt: skip
    sil = make_sil(impl, cfg)
    fill(sil, 1, [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0])  # P50 = 3 -> eligible: 4, 5, 6
    batch, _metrics = sil.draw(step=2, on_policy_rows=10)  # want ceil(0.5 * 10) = 5, eligible 3 -> 3
    assert len(batch) == 3 and sorted(batch.scores.tolist()) == [4.0, 5.0, 6.0]
    assert len(sil) == 7  # nothing flushed
    batch, _ = sil.draw(step=2, on_policy_rows=3)  # want 2
    assert len(batch) == 2


def test_every_step_capacity_evicts_oldest(impl: str) -> None:
    sil = make_sil(impl, official(replay_trigger="every_step", capacity_rows=3))
    fill(sil, 1, [1.0, 2.0])
    fill(sil, 2, [3.0, 4.0])
    assert sil.index.metadata()["score"].tolist() == [2.0, 3.0, 4.0]


def test_replay_batch_masks_follow_the_configured_flag(impl: str) -> None:
    for replay_mask, flag in (("attention", MASK_ATTENTION), ("response", MASK_RESPONSE)):
        sil = make_sil(impl, official(replay_trigger="every_step", replay_mask=replay_mask))
        batch = make_batch(scores=[0.0, 5.0], advantages=[1.0, 1.0], length=4)
        batch.mask[4:6] = MASK_ATTENTION  # row 1: first two tokens filtered out of the response mask
        sil.update(step=1, batch=batch)
        replay, _ = sil.draw(step=2, on_policy_rows=4)
        row = int(np.flatnonzero(replay.scores == 5.0)[0])
        expected = [1, 1, 1, 1] if flag == MASK_ATTENTION else [0, 0, 1, 1]
        assert replay.loss_mask()[row].tolist() == expected
        np.testing.assert_array_equal(replay.token_advantages()[row], replay.advantages[row] * np.array(expected))


def test_state_dict_round_trip_continues_identically(impl: str) -> None:
    cfg = official(replay_trigger="every_step", trajectory_buffer_size=3, recalibration_keep="nonnegative")
    a = make_sil(impl, cfg, seed=11)
    for step in range(1, 4):
        fill(a, step, [float(step + i) for i in range(5)])
    b = make_sil(impl, cfg, seed=999)
    b.load_state_dict(a.state_dict())
    for step in range(4, 7):
        ra, _ = a.draw(step, on_policy_rows=10)
        rb, _ = b.draw(step, on_policy_rows=10)
        np.testing.assert_array_equal(ra.row_ids, rb.row_ids)
        fill(a, step, [float(step)] * 3)
        fill(b, step, [float(step)] * 3)
    assert a.state_dict() == b.state_dict()


def test_cpp_and_numpy_policies_agree_on_a_long_random_run() -> None:
    rng = np.random.default_rng(3)
    cfgs = [official(trajectory_buffer_size=8), official(replay_trigger="every_step", capacity_rows=40)]
    for cfg in cfgs:
        sils = [make_sil(name, cfg, seed=5) for name in ("cpp", "numpy")]
        for step in range(1, 30):
            n = int(rng.integers(1, 12))
            batch_args = dict(
                scores=rng.normal(size=n).round(2).tolist(),
                advantages=rng.normal(size=n).round(2).tolist(),
                group_ids=rng.integers(0, 3, size=n).tolist(),
                traj_ids=rng.integers(0, 6, size=n).tolist(),
                length=int(rng.integers(0, 5)),
            )
            draws = [s.draw(step, on_policy_rows=n) for s in sils]
            assert draws[0][1] == draws[1][1]
            if draws[0][0] is not None:
                np.testing.assert_array_equal(draws[0][0].row_ids, draws[1][0].row_ids)
                np.testing.assert_array_equal(draws[0][0].advantages, draws[1][0].advantages)
            for s in sils:
                s.update(step, make_batch(**batch_args))
        assert sils[0].state_dict() == sils[1].state_dict()


def test_silbatch_validates_shapes() -> None:
    with pytest.raises(ValueError, match="scores has 1 rows"):
        SILBatch(
            tokens=np.zeros(4), logp=np.zeros(4), mask=np.zeros(4), lengths=[2, 2],
            group_ids=[0, 0], traj_ids=[0, 1], scores=[1.0], advantages=[0.0, 0.0],
        )  # fmt: skip
    with pytest.raises(ValueError, match="tokens has 3 tokens"):
        SILBatch(
            tokens=np.zeros(3), logp=np.zeros(4), mask=np.zeros(4), lengths=[2, 2],
            group_ids=[0, 0], traj_ids=[0, 1], scores=[1.0, 0.0], advantages=[0.0, 0.0],
        )  # fmt: skip


def test_row_has_flag_handles_empty_rows() -> None:
    batch = SILBatch(
        tokens=np.zeros(3), logp=np.zeros(3), mask=np.array([0, 2, 1]), lengths=[0, 2, 0, 1],
        group_ids=[0, 0, 0, 0], traj_ids=[0, 1, 2, 3], scores=[0.0] * 4, advantages=[0.0] * 4,
    )  # fmt: skip
    assert batch.row_has_flag(MASK_RESPONSE).tolist() == [False, True, False, False]
    assert batch.row_has_flag(MASK_ATTENTION).tolist() == [False, False, False, True]


PLAN_CONFIGS = {
    "official-fired": official(trajectory_buffer_size=2),
    "every-step-current": official(replay_trigger="every_step", trajectory_tolerate_steps=2, tolerate_steps_cap=None,
                                   staleness_anchor="current_step", capacity_rows=50),
    "every-step-newest": official(replay_trigger="every_step", capacity_rows=50),
}


@pytest.mark.parametrize("name", sorted(PLAN_CONFIGS))
def test_plan_draw_changes_nothing_until_commit(impl: str, name: str) -> None:
    sil = make_sil(impl, PLAN_CONFIGS[name], seed=3)
    for step in range(1, 4):
        fill(sil, step, [float(step + i) for i in range(6)])
    before = sil.state_dict()
    first = sil.plan_draw(step=4, on_policy_rows=8)  # every-step-current: step 1 is stale
    second = sil.plan_draw(step=4, on_policy_rows=8)
    assert sil.state_dict() == before  # planning twice draws the same rows and leaves the buffer as it was
    assert first.batch is not None and first.metrics == second.metrics
    np.testing.assert_array_equal(first.batch.row_ids, second.batch.row_ids)
    sil.commit(first)
    assert sil.state_dict() != before  # the generator advanced (and the flush / sweep happened)
    assert (len(sil) == 0) == first.flush


def test_stale_rows_are_not_drawn_and_commit_sweeps_them(impl: str) -> None:
    cfg = PLAN_CONFIGS["every-step-current"]
    sil = make_sil(impl, cfg, seed=1)
    fill(sil, 1, [50.0, 60.0, 70.0])  # stale at step 4 (4 - 1 > 2), and the best scores
    fill(sil, 3, [1.0, 2.0, 3.0, 4.0, 5.0])
    plan = sil.plan_draw(step=4, on_policy_rows=40)
    assert plan.evict_at_step == 4 and len(sil) == 8
    assert set(plan.batch.steps.tolist()) == {3} and set(plan.batch.scores.tolist()) <= {1.0, 2.0, 3.0, 4.0, 5.0}
    sil.commit(plan)
    assert sil.index.metadata()["step"].tolist() == [3] * 5


def test_dropping_a_plan_equals_restoring_a_snapshot(impl: str) -> None:
    """The trainer of a skipped step drops its plan; that must leave the buffer exactly where a snapshot taken
    before a mutating draw, restored after it, would (same draws afterwards, same bytes)."""
    rng = np.random.default_rng(7)
    for cfg in PLAN_CONFIGS.values():
        planned, snapshot = make_sil(impl, cfg, seed=9), make_sil(impl, cfg, seed=9)
        for step in range(1, 25):
            n = int(rng.integers(1, 8))
            rows = dict(scores=rng.normal(size=n).round(2).tolist(), advantages=rng.normal(size=n).round(2).tolist(),
                        group_ids=rng.integers(0, 3, size=n).tolist(), length=int(rng.integers(1, 4)))  # fmt: skip
            skipped = bool(rng.random() < 0.4)
            plan = planned.plan_draw(step, on_policy_rows=n)
            saved = snapshot.state_dict()
            batch, metrics = snapshot.draw(step, on_policy_rows=n)
            assert plan.metrics == metrics and (plan.batch is None) == (batch is None)
            if batch is not None:
                np.testing.assert_array_equal(plan.batch.row_ids, batch.row_ids)
                np.testing.assert_array_equal(plan.batch.advantages, batch.advantages)
            if skipped:
                snapshot.load_state_dict(saved)
                continue
            planned.commit(plan)
            planned.update(step, make_batch(**rows))
            snapshot.update(step, make_batch(**rows))
            assert planned.state_dict() == snapshot.state_dict()
