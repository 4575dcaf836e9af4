"""SPEAR self-imitation: what enters the replay buffer, when replay fires, and with which advantages.

This is the replay *policy* (docs/algorithm.md, 'Self-imitation replay') on top of the C++ replay index
(:mod:`spear_engine.replay`), which stores the rows. Each official quirk is a named option of
:class:`~spear_engine.config.ReplayConfig`; ``spear-official`` reproduces the official code:

* after the actor update of step t (:meth:`SelfImitation.update`): drop stale rows, push the
  baseline statistics of the step's (post-rollout-filter) batch, admit rows with advantage > 0;
* before the actor update of step t (:meth:`SelfImitation.draw`): official mode fires only when more
  than 1.5 N rows beat the P50 baseline, recalibrates A = score - P50, drops rows below it, draws a
  power of two <= N uniformly and flushes the buffer; every-step mode draws every step and keeps it.

Rows are whatever the trainer trains on (a step-sample or a whole trajectory): token ids, behaviour
log-probs and a per-token flag byte (:data:`MASK_ATTENTION`, :data:`MASK_RESPONSE`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from spear_engine.algorithms.filters import group_score_stats
from spear_engine.config import AlgorithmConfig, ReplayConfig
from spear_engine.data import MASK_ATTENTION, MASK_RESPONSE, ReplayBatch, SILBatch

STD_EPSILON = 1e-6
"""Added to the baseline std when recalibrated advantages are std-normalised (as the official code)."""


@dataclass(frozen=True)
class DrawPlan:
    """A replay draw that has not touched the buffer (:meth:`SelfImitation.plan_draw`): the rows to train
    on, and what :meth:`SelfImitation.commit` does to the buffer once the step is kept. Planning instead of
    snapshotting keeps a skipped step O(1) whatever the buffer size."""

    batch: ReplayBatch | None
    metrics: dict[str, float]
    evict_at_step: int | None
    """The staleness sweep of the draw (every-step mode, ``staleness_anchor=current_step``), or None."""
    flush: bool
    """Whether the draw empties the buffer (``when_full_then_flush`` once it fired)."""
    rng_state: tuple[int, ...]
    """The index generator's state after the draw."""


def trajectory_mean_scores(scores: np.ndarray, traj_ids: np.ndarray) -> np.ndarray:
    """Mean score of each trajectory's rows (the ``trajectory`` baseline unit), in first-seen order."""
    traj_order, inverse = _first_seen_inverse(traj_ids)
    sums = np.bincount(inverse, weights=scores, minlength=len(traj_order))
    return sums / np.bincount(inverse, minlength=len(traj_order))


def _first_seen_inverse(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unique ids in order of first appearance, and each element's position in that order."""
    uniq, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return uniq[order], rank[inverse]


def largest_power_of_two_at_most(n: int) -> int:
    """2^floor(log2 n) for n >= 1."""
    return 1 << (int(n).bit_length() - 1)


class SelfImitation:
    """The SPEAR replay buffer policy for one rank."""

    def __init__(
        self,
        replay: ReplayConfig,
        algorithm: AlgorithmConfig,
        seed: int = 0,
        min_replay_rows: int = 1,
        index_factory: Callable[..., Any] | None = None,
        window_factory: Callable[..., Any] | None = None,
    ) -> None:
        if index_factory is None or window_factory is None:
            from spear_engine.replay import BaselineWindow, ReplayIndex

            index_factory = index_factory or ReplayIndex
            window_factory = window_factory or BaselineWindow
        self.replay = replay
        self.algorithm = algorithm
        self.min_replay_rows = min_replay_rows
        capacity = replay.capacity_rows if replay.replay_trigger == "every_step" else 0
        self.index = index_factory(capacity_rows=capacity, eviction="oldest", seed=seed)
        window_eviction = "value" if replay.baseline_eviction == "fifo" else "step_entries"
        self.mean_window = window_factory(capacity=replay.baseline_buffer_size, eviction=window_eviction)
        self.std_window = window_factory(capacity=replay.baseline_buffer_size, eviction=window_eviction)

    # -------------------------------------------------------------------------------------------
    # derived settings
    # -------------------------------------------------------------------------------------------
    @property
    def recalibration_mode(self) -> bool:
        """w <= 0 or w > 1: recalibrate against the P50 baseline; 0 < w <= 1: decay stored advantages."""
        w = self.replay.weight_decay_trajectory_replay
        return not (0.0 < w <= 1.0)

    @property
    def tolerate_steps(self) -> int:
        tau = self.replay.trajectory_tolerate_steps
        cap = self.replay.tolerate_steps_cap
        return tau if cap is None else min(tau, cap)

    @property
    def loss_mask_flag(self) -> int:
        return MASK_ATTENTION if self.replay.replay_mask == "attention" else MASK_RESPONSE

    def __len__(self) -> int:
        return len(self.index)

    # -------------------------------------------------------------------------------------------
    # after the actor update of step t
    # -------------------------------------------------------------------------------------------
    def update(
        self, step: int, batch: SILBatch, baseline: tuple[np.ndarray, np.ndarray] | None = None
    ) -> dict[str, float]:
        """Staleness sweep, baseline statistics, admission, in order (docs/algorithm.md, 'Buffer update').

        ``baseline``: the (values, group stds) to push instead of this batch's own
        (:meth:`baseline_statistics`) - a multi-rank trainer passes every rank's, gathered, so the
        baseline windows of all ranks stay identical.
        """
        if self.replay.staleness_anchor == "newest_row":
            self.index.evict_stale(self.tolerate_steps)
        else:
            self.index.evict_stale(self.tolerate_steps, current_step=step)
        values, stds = baseline if baseline is not None else self.baseline_statistics(batch)
        if len(values):
            self.mean_window.push(step, values)
            self.std_window.push(step, stds)
        admitted = self._admission_values(batch)
        ids = self.index.insert_batch(
            batch.tokens,
            batch.logp,
            batch.mask,
            batch.lengths,
            np.full(len(batch), step, dtype=np.int64),
            batch.group_ids,
            batch.traj_ids,
            batch.scores,
            admitted,
            self.replay.admission_threshold,
        )
        n_admitted = int((np.asarray(ids) >= 0).sum())
        return {
            "replay/admitted_rows": float(n_admitted),
            "replay/buffer_rows": float(len(self.index)),
            "trajectory_sft_buffersize": float(len(self.index)),
        }

    def baseline_statistics(self, batch: SILBatch) -> tuple[np.ndarray, np.ndarray]:
        """What this batch adds to the baseline windows: group means (or trajectory means) and group stds."""
        if len(batch) == 0:
            return np.zeros(0), np.zeros(0)
        _, group_means, group_stds = group_score_stats(batch.scores, batch.group_ids, batch.traj_ids)
        if self.replay.baseline_unit == "group_mean":
            return group_means, group_stds
        return trajectory_mean_scores(batch.scores, batch.traj_ids), group_stds

    def _admission_values(self, batch: SILBatch) -> np.ndarray:
        """The value compared with the admission threshold, per row (-inf = never admitted).

        A row whose filtered response mask is empty has zero token advantages, so the official
        ``mean_k A > 0`` test rejects it; we reject it whatever the threshold.
        """
        trainable = batch.row_has_flag(MASK_RESPONSE)
        if self.replay.admission_level == "step":
            values = batch.advantages.copy()
        else:
            traj_order, inverse = _first_seen_inverse(batch.traj_ids)
            sums = np.bincount(inverse, weights=batch.episode_advantages, minlength=len(traj_order))
            counts = np.bincount(inverse, minlength=len(traj_order))
            values = (sums / counts)[inverse]
        values[~trainable] = -math.inf
        return values

    # -------------------------------------------------------------------------------------------
    # before the actor update of step t
    # -------------------------------------------------------------------------------------------
    def baseline(self) -> tuple[float, float] | None:
        """(P50 of the stored means, P50 of the stored stds), or None before any statistics exist."""
        if len(self.mean_window) == 0:
            return None
        return float(self.mean_window.percentile(50.0)), float(self.std_window.percentile(50.0))

    def recalibrated_advantages(self, scores: np.ndarray, stored_advantages: np.ndarray) -> np.ndarray:
        """Recalibrated A = s - b (or (s - b)/(b_sigma + 1e-6) with std-norm); decay mode A = w * A_stored."""
        if not self.recalibration_mode:
            return self.replay.weight_decay_trajectory_replay * stored_advantages
        base = self.baseline()
        if base is None:
            return np.zeros_like(scores)
        b_mean, b_std = base
        if self.algorithm.norm_adv_by_std_in_grpo:
            return (scores - b_mean) / (b_std + STD_EPSILON)
        return scores - b_mean

    def _keep_after_recalibration(self, advantages: np.ndarray) -> np.ndarray:
        if not self.recalibration_mode:
            return np.ones(len(advantages), dtype=bool)
        if self.replay.recalibration_keep == "nonnegative":
            return advantages >= 0
        return advantages > 0

    def qualifying_rows(self) -> int:
        """Official ``get_buffer_size``: rows whose score beats the P50 baseline (recalibration mode)."""
        if not self.recalibration_mode:
            return len(self.index)
        if len(self.mean_window) > 0:
            return int(self.index.count_score_above(self.mean_window.percentile(50.0)))
        meta = self.index.metadata()
        count = 0
        for step in np.unique(meta["step"]):  # no statistics yet: each step's rows vs their own mean
            chunk = meta["score"][meta["step"] == step]
            count += int((chunk > chunk.mean()).sum())
        return count

    def draw(self, step: int, on_policy_rows: int) -> tuple[ReplayBatch | None, dict[str, float]]:
        """The replay batch for step t (None when no replay happens this step), committed at once."""
        plan = self.plan_draw(step, on_policy_rows)
        self.commit(plan)
        return plan.batch, plan.metrics

    def plan_draw(self, step: int, on_policy_rows: int) -> DrawPlan:
        """The replay batch for step t without changing the buffer: the staleness sweep and the flush that
        the draw implies, and the generator's advance, are recorded in the plan and applied by
        :meth:`commit` once the step's update succeeded (a skipped step just drops the plan)."""
        start = self.index.rng_state
        if self.replay.replay_trigger == "when_full_then_flush":
            batch, metrics, flush = self._draw_when_full()
            evict_at = None
        else:
            batch, metrics = self._draw_every_step(step, on_policy_rows)
            flush, evict_at = False, step if self.replay.staleness_anchor == "current_step" else None
        after = self.index.rng_state
        self.index.rng_state = start
        return DrawPlan(batch, metrics, evict_at, flush, after)

    def commit(self, plan: DrawPlan) -> None:
        """Apply a plan of :meth:`plan_draw` to the buffer (before :meth:`update` of the same step)."""
        if plan.evict_at_step is not None:
            self.index.evict_stale(self.tolerate_steps, current_step=plan.evict_at_step)
        if plan.flush:
            self.index.flush()
        self.index.rng_state = plan.rng_state

    def _draw_when_full(self) -> tuple[ReplayBatch | None, dict[str, float], bool]:
        """(batch, metrics, whether the buffer is flushed): fires once enough rows beat the baseline."""
        n_cap = self.replay.trajectory_buffer_size
        qualifying = self.qualifying_rows()
        metrics = {"replay/qualifying_rows": float(qualifying), "replay/fired": 0.0}
        if qualifying <= self.replay.full_factor * n_cap:
            return None, metrics, False
        meta = self.index.metadata()
        advantages = self.recalibrated_advantages(meta["score"], meta["advantage"])
        keep = self._keep_after_recalibration(advantages)
        n = int(keep.sum())
        k = 0 if n <= 1 else min(largest_power_of_two_at_most(n), n_cap)
        metrics.update({"replay/fired": 1.0, "replay/eligible_rows": float(n)})
        batch = None
        if k >= max(self.min_replay_rows, 1):
            batch = self._gather(meta, advantages, keep, k)
        metrics["replay/drawn_rows"] = float(len(batch) if batch is not None else 0)
        return batch, metrics, True

    def _draw_every_step(self, step: int, on_policy_rows: int) -> tuple[ReplayBatch | None, dict[str, float]]:
        meta = self.index.metadata()
        if self.replay.staleness_anchor == "current_step":  # the rows commit() sweeps out are not drawn
            fresh = meta["step"] >= step - self.tolerate_steps  # evict_stale keeps step - row step <= window
            if not fresh.all():
                meta = {name: column[fresh] for name, column in meta.items()}
        advantages = self.recalibrated_advantages(meta["score"], meta["advantage"])
        keep = self._keep_after_recalibration(advantages)
        n = int(keep.sum())
        want = math.ceil(self.replay.replay_batch_ratio * on_policy_rows)
        k = min(self.replay.trajectory_buffer_size, want, n)
        metrics = {
            "replay/eligible_rows": float(n),
            "replay/fired": float(k >= self.min_replay_rows and k > 0),
        }
        batch = self._gather(meta, advantages, keep, k) if k >= max(self.min_replay_rows, 1) else None
        metrics["replay/drawn_rows"] = float(len(batch) if batch is not None else 0)
        return batch, metrics

    def _gather(
        self, meta: dict[str, np.ndarray], advantages: np.ndarray, keep: np.ndarray, k: int
    ) -> ReplayBatch:
        candidates = meta["row_id"][keep]
        if self.replay.replay_draw == "uniform":
            drawn = np.asarray(self.index.draw(k, "uniform", candidates))
        else:
            base = self.baseline()
            floor = base[0] if base is not None and self.recalibration_mode else 0.0
            drawn = np.asarray(self.index.draw(k, "score", candidates, floor))
        position = {int(r): i for i, r in enumerate(meta["row_id"])}
        rows = np.array([position[int(r)] for r in drawn], dtype=np.int64)
        tokens, logp, mask, lengths = self.index.gather(drawn)
        return ReplayBatch(
            row_ids=drawn,
            tokens=tokens,
            logp=logp,
            mask=mask,
            lengths=lengths,
            advantages=advantages[rows],
            scores=meta["score"][rows],
            steps=meta["step"][rows],
            loss_mask_flag=self.loss_mask_flag,
        )

    # -------------------------------------------------------------------------------------------
    # checkpoints
    # -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, bytes]:
        return {
            "index": self.index.to_bytes(),
            "mean_window": self.mean_window.to_bytes(),
            "std_window": self.std_window.to_bytes(),
        }

    def load_state_dict(self, state: dict[str, bytes]) -> None:
        self.index = type(self.index).from_bytes(state["index"])
        self.mean_window = type(self.mean_window).from_bytes(state["mean_window"])
        self.std_window = type(self.std_window).from_bytes(state["std_window"])
