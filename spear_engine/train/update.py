"""The actor update: on-policy mini-batches, then the self-imitation replay (spec 1.4, 3.6).

``update_actor`` is model-agnostic: it takes a ``forward(rows) -> (log_probs, entropy)`` callable
over a row selection, so the same loop drives a transformer (the trainer) or the toy policy of
``spear demo``. Replay rows use the same loss function with the replay constants
(``replay_loss_config``), their stored behaviour log-probs as ``old_log_prob``, their recalibrated
advantages, no KL, and the loss scaled by c(t):

* ``replay_update=sequential`` (official): after the on-policy mini-batches, one optimizer step per
  replay mini-batch;
* ``replay_update=joint`` (paper): the replay rows are spread over the on-policy mini-batches and
  each optimizer step takes the on-policy loss plus c(t) times the replay loss.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from spear_engine.algorithms.losses import (
    actor_loss,
    agg_loss,
    config_view,
    get_policy_loss_fn,
    kl_penalty,
    legacy_global_batch_info,
    replay_loss_config,
)
from spear_engine.config import ActorConfig

Forward = Callable[[np.ndarray, "LossRows"], tuple[torch.Tensor, torch.Tensor]]
"""forward(row_indices, rows) -> (log_probs [b, W], entropy [b, W]) with gradients."""


@dataclass
class LossRows:
    """Rows for the policy loss, all [N, W] and aligned: position k of row i is one token."""

    inputs: Any
    """Whatever ``forward`` needs to rebuild row i (token ids, ...); indexed by ``forward`` itself."""
    old_log_probs: torch.Tensor
    advantages: torch.Tensor
    loss_mask: torch.Tensor
    weights: torch.Tensor | None = None
    """Per-token importance weights of the policy loss (rollout/trainer mismatch correction), or None."""
    ref_log_probs: torch.Tensor | None = None
    """Reference-policy log-probs for the KL loss (``actor.use_kl_loss``), or None."""

    def __len__(self) -> int:
        return int(self.loss_mask.shape[0])


def _chunks(n: int, size: int) -> list[np.ndarray]:
    return [np.arange(s, min(s + size, n)) for s in range(0, n, size)]


class _MetricSums:
    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    def add(self, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.sums[k] += float(v)
            self.counts[k] += 1

    def means(self) -> dict[str, float]:
        return {k: self.sums[k] / self.counts[k] for k in self.sums}


def _micro_loss(
    forward: Forward, rows: LossRows, idx: np.ndarray, config: ActorConfig, loss_config: Any
) -> tuple[torch.Tensor, dict[str, float]]:
    """The actor objective of one micro-batch (pg - entropy_coeff * H) and its metrics."""
    log_probs, entropy = forward(idx, rows)
    mask = rows.loss_mask[idx]
    loss_fn = get_policy_loss_fn(config.policy_loss.loss_mode)
    weights = None if rows.weights is None else rows.weights[idx]
    pg_loss, metrics = loss_fn(
        rows.old_log_probs[idx], log_probs, rows.advantages[idx], mask, config.loss_agg_mode, loss_config, weights
    )
    info = loss_config.global_batch_info
    entropy_agg = agg_loss(entropy, mask, config.loss_agg_mode, **info) if config.entropy_coeff else None
    kl_agg = None
    if config.use_kl_loss and rows.ref_log_probs is not None:
        kl = kl_penalty(log_probs, rows.ref_log_probs[idx], config.kl_loss_type)
        kl_agg = agg_loss(kl, mask, config.loss_agg_mode, **info)
    loss = actor_loss(pg_loss, entropy_agg, config.entropy_coeff, kl_agg, config.kl_loss_coef)
    out = {k.removeprefix("actor/"): float(v) for k, v in metrics.items()}
    if kl_agg is not None:
        out["kl_loss"] = float(kl_agg.detach())
    out["pg_loss"] = float(pg_loss.detach())
    out["entropy"] = float((entropy.detach() * mask).sum() / mask.sum().clamp_min(1))
    return loss, out


@dataclass
class _Part:
    """Rows that contribute to one optimizer step, with their loss config and scale (c(t) for replay)."""

    rows: LossRows
    mini: np.ndarray
    loss_config: Any
    scale: float
    sums: _MetricSums


def _global_counts(mask: torch.Tensor, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Valid tokens and non-empty rows of a mini-batch, summed over all data-parallel ranks."""
    counts = torch.stack([mask.sum(), (mask.sum(-1) > 0).sum()]).double()
    if world_size > 1:
        torch.distributed.all_reduce(counts)
    return counts[0].clamp_min(1), counts[1].clamp_min(1)


def _micro_plan(part: _Part, config: ActorConfig, world_size: int) -> list[tuple[np.ndarray, Any, float]]:
    """(indices, loss config with its batch info, factor) per micro-batch, normalised as the configured verl.

    verl 0.9: every micro-batch is normalised by the *global mini-batch* token / sequence counts (summed
    over the data-parallel ranks, times ``dp_size`` because the ranks' gradients are averaged) and the
    gradients add up, so N ranks reproduce one process on the same data. Older verl (``legacy_agg_loss``,
    the official SPEAR code): each micro-batch is normalised on its own, then divided by the number of
    micro-batches (grad_accum).
    """
    micros = _chunks(len(part.mini), config.ppo_micro_batch_size_per_gpu)
    tokens, rows = _global_counts(part.rows.loss_mask[part.mini], world_size)
    mini_info = {"batch_num_tokens": tokens, "global_batch_size": rows, "dp_size": world_size}
    plan = []
    for micro in micros:
        idx = part.mini[micro]
        if config.legacy_agg_loss:
            info, divisor = legacy_global_batch_info(config.loss_agg_mode, part.rows.loss_mask[idx]), len(micros)
        else:
            info, divisor = mini_info, 1
        plan.append((idx, config_view(part.loss_config, global_batch_info=info), part.scale / divisor))
    return plan


def _optimizer_step(backend: Any, forward: Forward, config: ActorConfig, parts: list[_Part]) -> tuple[float, bool]:
    """Backward over every micro-batch of ``parts``, then one optimizer step.

    A non-finite micro-batch loss (on any rank) discards the accumulated gradients and skips the step,
    so weights and optimizer state stay as they were; a non-finite gradient norm is skipped by the backend.
    """
    world_size = getattr(backend, "world_size", 1)
    plan = [(part, *micro) for part in parts for micro in _micro_plan(part, config, world_size)]
    finite = True
    for k, (part, idx, loss_config, factor) in enumerate(plan):
        loss, metrics = _micro_loss(forward, part.rows, idx, config, loss_config)
        finite &= bool(torch.isfinite(loss.detach()))
        backend.backward(loss * factor, boundary=k == len(plan) - 1)
        part.sums.add(metrics)
    if world_size > 1:
        flag = torch.tensor([0.0 if finite else 1.0])
        torch.distributed.all_reduce(flag)
        finite = flag.item() == 0
    if not finite:
        backend.discard_gradients()
        return float("nan"), False
    return backend.step()


def update_actor(
    forward: Forward,
    backend: Any,
    config: ActorConfig,
    on_policy: LossRows,
    replay: LossRows | None = None,
    replay_coef: float = 0.0,
    replay_update: str = "sequential",
    shuffle_seed: int | None = None,
) -> dict[str, float]:
    """PPO epochs over the on-policy rows, plus the replay rows scaled by ``replay_coef`` (c(t)).

    ``backend`` offers ``backward(loss, boundary)``, ``step() -> (grad_norm, stepped)`` and
    ``discard_gradients()`` (:mod:`spear_engine.train.backends`).
    """
    replay_cfg = replay_loss_config(config) if config.policy_loss.replay_uses_replay_params else config
    with_replay = replay is not None and len(replay) > 0 and replay_coef > 0
    on_sums, rp_sums = _MetricSums(), _MetricSums()
    grad_norms, replay_norms, skipped = [], [], 0
    generator = np.random.default_rng(shuffle_seed)
    for _ in range(config.ppo_epochs):
        order = generator.permutation(len(on_policy)) if shuffle_seed is not None else np.arange(len(on_policy))
        minis = [order[m] for m in _chunks(len(on_policy), config.ppo_mini_batch_size)]
        replay_parts: list[np.ndarray] = []
        if with_replay and replay_update == "joint":
            replay_parts = np.array_split(np.arange(len(replay)), len(minis))
        for i, mini in enumerate(minis):
            parts = [_Part(on_policy, mini, config, 1.0, on_sums)]
            if replay_parts and len(replay_parts[i]):
                parts.append(_Part(replay, replay_parts[i], replay_cfg, replay_coef, rp_sums))
            norm, ok = _optimizer_step(backend, forward, config, parts)
            grad_norms.append(norm)
            skipped += not ok
        if with_replay and replay_update == "sequential":
            for mini in _chunks(len(replay), config.ppo_mini_batch_size):
                norm, ok = _optimizer_step(backend, forward, config, [_Part(replay, mini, replay_cfg, replay_coef, rp_sums)])
                replay_norms.append(norm)
                skipped += not ok
    finite_norms = [n for n in grad_norms if np.isfinite(n)]
    metrics = {f"actor/{k}": v for k, v in on_sums.means().items()}
    metrics.update({f"actor/{k}_replay": v for k, v in rp_sums.means().items()})
    metrics["actor/grad_norm"] = float(np.mean(finite_norms)) if finite_norms else 0.0
    if replay_norms:
        finite_replay = [n for n in replay_norms if np.isfinite(n)]
        metrics["actor/grad_norm_replay"] = float(np.mean(finite_replay)) if finite_replay else 0.0
    metrics["actor/skipped_steps"] = float(skipped)
    metrics["actor/optimizer_steps"] = float(len(grad_norms) + len(replay_norms) - skipped)
    metrics["actor/replay_rows"] = float(len(replay)) if with_replay else 0.0
    return metrics
