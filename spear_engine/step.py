"""One SPEAR training step on a rollout batch, written once for the trainer and for ``spear demo``.

Top to bottom it is docs/algorithm.md's 'One training step': pad the batch → rewards with the tool-call
bonus and the Dr.BoT filters → group filter → old log-probs (with the rollout/trainer mismatch) →
advantages → replay draw (planned, the buffer untouched) → actor update (on-policy + c(t)·replay) →
replay buffer update (the draw committed, the step's rows admitted). A step whose every optimizer step
was skipped (non-finite loss or gradients) changes nothing: not the model, not the random generators,
not the buffer. Rollout, weight sync, evaluation and checkpoints are the caller's.

What differs between an LLM (the trainer) and the demo's toy policy sits behind :class:`Learner`.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from spear_engine.algorithms.losses import agg_loss
from spear_engine.algorithms.rollout_correction import rollout_correction
from spear_engine.algorithms.self_imitation import SelfImitation
from spear_engine.config import SpearConfig
from spear_engine.data import ReplayBatch, RolloutBatch, ScoredBatch, SILBatch
from spear_engine.metrics import StageClock
from spear_engine.pipeline import (
    compute_advantages,
    filter_groups,
    pad_batch,
    schedule_metrics,
    score_and_filter,
    sil_batch,
)
from spear_engine.train.backends import Backend
from spear_engine.train.checkpoint import capture_rng_state, restore_rng_state
from spear_engine.train.update import LossRows, update_actor

SEED_STRIDE = 1_000_003
"""Per-step seeds are ``seed * SEED_STRIDE + offset``: runs with nearby seeds draw from distinct streams."""


class Learner(Protocol):
    """The policy side of a step: how rows become model inputs and log-probs, and how the update runs."""

    backend: Backend
    rank: int
    world_size: int
    fused_loss: bool
    """Whether ``forward`` accepts the loss and fuses it into the head (``actor.fused_loss``)."""

    def inputs(self, batch: RolloutBatch) -> Any:
        """The model inputs of the batch's rows (``LossRows.inputs``)."""

    def loss_rows(self, inputs: Any, **tensors: torch.Tensor | None) -> LossRows:
        """``LossRows(inputs, **tensors)`` ready for the update (token counts, device)."""

    def token_stats(self, inputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probs and entropies of the rows' response tokens under the current policy, no gradient."""

    def ref_log_prob(self, inputs: Any) -> torch.Tensor | None:
        """Reference-policy log-probs when the config needs them (KL loss or KL in the reward), else None."""

    def forward(self, idx: np.ndarray, rows: LossRows, loss: Any = None) -> tuple[Any, ...]:
        """The training forward of rows ``idx`` (see :func:`spear_engine.train.update.update_actor`)."""

    def replay_rows(self, replay: ReplayBatch) -> LossRows:
        """The drawn replay rows as loss rows."""

    def old_log_probs_from_update(self, rows: int) -> bool:
        """Whether the update's own first forward can give the old log-probs (exactly on-policy)."""

    def updating(self) -> AbstractContextManager[Any]:
        """Entered around the update (the trainer puts a rollout engine with its own weights to sleep)."""

    def gathered_baseline(self, rows: SILBatch) -> tuple[np.ndarray, np.ndarray] | None:
        """Every rank's baseline statistics of the step (None: this rank's own)."""


@dataclass
class StepOutcome:
    metrics: dict[str, float]
    skipped: bool
    """Every optimizer step was skipped: model, generators and replay buffer are as before the step."""
    scored: ScoredBatch
    """The batch that was trained on (after padding and both filters)."""


def train_on_batch(
    config: SpearConfig,
    step: int,
    batch: RolloutBatch,
    learner: Learner,
    sil: SelfImitation | None,
    clock: StageClock | None = None,
) -> StepOutcome:
    """Step ``step`` of training on this rank's rollout ``batch``; ``clock`` times the stages."""
    clock = clock or StageClock()
    seed = config.trainer.seed
    metrics: dict[str, float] = schedule_metrics(config, step)

    with clock("rewards_filters"):
        pad_rng = np.random.default_rng((seed % 2**32, step, learner.rank))  # a resumed run pads alike
        batch, m = pad_batch(config, batch, pad_rng, learner.world_size)
        metrics.update(m)
        scored, m = score_and_filter(config, batch, step)
        metrics.update(m)
        scored, m = filter_groups(config, scored, seed * SEED_STRIDE + step)
        metrics.update(m)
        batch = scored.batch
        inputs = learner.inputs(batch)

    with clock("old_log_prob"):
        from_update = learner.old_log_probs_from_update(len(batch))  # exactly on-policy: no separate pass
        metrics["trainer/old_log_prob_from_update"] = float(from_update)
        old_log_prob, is_weights = None, None
        if not from_update:
            old_log_prob, entropy = learner.token_stats(inputs)
            is_weights, m = rollout_mismatch(config, scored, old_log_prob, entropy)
            metrics.update(m)
        ref = learner.ref_log_prob(inputs)

    with clock("advantages_replay"):
        advantages, m = compute_advantages(config, scored, old_log_prob, ref)
        metrics.update(m)
        plan = sil.plan_draw(step, on_policy_rows=len(batch)) if sil is not None else None
        replay_rows = None
        if plan is not None:
            metrics.update(plan.metrics)
            replay_rows = learner.replay_rows(plan.batch) if plan.batch is not None else None

    with clock("update"):
        loss_mask = scored.response_mask if config.actor.use_filtered_response_mask else batch.policy_mask.float()
        on_policy = learner.loss_rows(inputs, old_log_prob=old_log_prob, advantages=advantages.advantages,
                                      loss_mask=loss_mask, weights=is_weights, ref_log_prob=ref)  # fmt: skip
        rng_before = capture_rng_state()  # the loss may draw (Clip-Cov); a skipped step must not have drawn
        with learner.updating():
            update = update_actor(
                learner.forward, learner.backend, config.actor, on_policy, replay_rows,
                replay_coef=metrics["schedule/replay_coef"], replay_update=config.replay.replay_update,
                fused=learner.fused_loss,
            )  # fmt: skip
        metrics.update(update)
        if from_update:  # the update's first forward of each row was the old policy
            old_log_prob = on_policy.forward_log_prob
            assert old_log_prob is not None and on_policy.forward_entropy is not None
            metrics.update(rollout_mismatch(config, scored, old_log_prob, on_policy.forward_entropy)[1])
        skipped = step_skipped(update)
        if skipped:  # nothing was learned: the generators stay as before the update, as the weights do
            restore_rng_state(rng_before)

    with clock("replay_update"):
        if sil is not None and plan is not None and skipped:  # the plan is dropped: the buffer is untouched
            metrics.update({"replay/admitted_rows": 0.0, "replay/buffer_rows": float(len(sil))})
        elif sil is not None and plan is not None:
            sil.commit(plan)
            rows = sil_batch(scored, advantages, old_log_prob)
            metrics.update(sil.update(step, rows, learner.gathered_baseline(rows)))
    return StepOutcome(metrics, skipped, scored)


def rollout_mismatch(
    config: SpearConfig, scored: ScoredBatch, old_log_prob: torch.Tensor, entropy: torch.Tensor
) -> tuple[torch.Tensor | None, dict[str, float]]:
    """(truncated IS weights or None, metrics): the entropy of the rollout and the engine/trainer mismatch."""
    batch = scored.batch
    policy_mask = batch.policy_mask.float()
    metrics = {"rollout/entropy": float(agg_loss(entropy, policy_mask, "token-mean"))}
    if scored.response_mask.any():  # the official metric (sum-normalised in Dr.BoT modes); NaN-free
        metrics["actor/entropy_loss"] = float(agg_loss(entropy, scored.response_mask, config.actor.loss_agg_mode))
    ro = config.rollout
    is_weights, m = rollout_correction(batch.rollout_log_probs, old_log_prob, policy_mask, ro.rollout_is,
                                       ro.rollout_is_threshold)  # fmt: skip
    return is_weights, {**metrics, **m}


def step_skipped(update: dict[str, float]) -> bool:
    """Every optimizer step of the update was skipped (non-finite loss or gradients)."""
    return update.get("actor/skipped_steps", 0.0) > 0 and update.get("actor/optimizer_steps", 0.0) == 0
