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

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from spear_engine.algorithms.losses import (
    actor_loss,
    agg_loss,
    config_view,
    get_policy_loss_fn,
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
    pg_loss, metrics = loss_fn(
        rows.old_log_probs[idx], log_probs, rows.advantages[idx], mask, config.loss_agg_mode, loss_config
    )
    entropy_agg = None
    if config.entropy_coeff:
        entropy_agg = agg_loss(entropy, mask, config.loss_agg_mode, **loss_config.global_batch_info)
    loss = actor_loss(pg_loss, entropy_agg, config.entropy_coeff)
    out = {k.removeprefix("actor/"): float(v) for k, v in metrics.items()}
    out["pg_loss"] = float(pg_loss.detach())
    out["entropy"] = float((entropy.detach() * mask).sum() / mask.sum().clamp_min(1))
    return loss, out


def _optimizer_step(
    optimizer: torch.optim.Optimizer, params: Sequence[torch.nn.Parameter], grad_clip: float
) -> tuple[float, bool]:
    """Clip, then step unless the gradient norm is not finite (the step is skipped, as the official code)."""
    norm = float(torch.nn.utils.clip_grad_norm_(params, grad_clip))
    finite = math.isfinite(norm)
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm, finite


def _accumulate(
    forward: Forward,
    rows: LossRows,
    mini: np.ndarray,
    config: ActorConfig,
    loss_config: Any,
    scale: float,
    sums: _MetricSums,
) -> None:
    """Backward over the micro-batches of one mini-batch, normalised as the configured verl would.

    verl 0.9: every micro-batch is normalised by the *mini-batch* token / sequence counts and the
    gradients add up. Older verl (``legacy_agg_loss``, the official SPEAR code): each micro-batch is
    normalised on its own, then divided by the number of micro-batches (grad_accum).
    """
    micros = _chunks(len(mini), config.ppo_micro_batch_size_per_gpu)
    mini_mask = rows.loss_mask[mini]
    mini_info = {
        "batch_num_tokens": mini_mask.sum().clamp_min(1),
        "global_batch_size": (mini_mask.sum(-1) > 0).sum().clamp_min(1),
    }
    for micro in micros:
        idx = mini[micro]
        if config.legacy_agg_loss:
            info, divisor = legacy_global_batch_info(config.loss_agg_mode, rows.loss_mask[idx]), len(micros)
        else:
            info, divisor = mini_info, 1
        loss, metrics = _micro_loss(forward, rows, idx, config, config_view(loss_config, global_batch_info=info))
        (loss * (scale / divisor)).backward()
        sums.add(metrics)


def update_actor(
    forward: Forward,
    optimizer: torch.optim.Optimizer,
    params: Sequence[torch.nn.Parameter],
    config: ActorConfig,
    on_policy: LossRows,
    replay: LossRows | None = None,
    replay_coef: float = 0.0,
    replay_update: str = "sequential",
    shuffle_seed: int | None = None,
) -> dict[str, float]:
    """PPO epochs over the on-policy rows, plus the replay rows scaled by ``replay_coef`` (c(t))."""
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
            _accumulate(forward, on_policy, mini, config, config, 1.0, on_sums)
            if replay_parts and len(replay_parts[i]):
                _accumulate(forward, replay, replay_parts[i], config, replay_cfg, replay_coef, rp_sums)
            norm, ok = _optimizer_step(optimizer, params, config.grad_clip)
            grad_norms.append(norm)
            skipped += not ok
        if with_replay and replay_update == "sequential":
            for mini in _chunks(len(replay), config.ppo_mini_batch_size):
                _accumulate(forward, replay, mini, config, replay_cfg, replay_coef, rp_sums)
                norm, ok = _optimizer_step(optimizer, params, config.grad_clip)
                replay_norms.append(norm)
                skipped += not ok
    metrics = {f"actor/{k}": v for k, v in on_sums.means().items()}
    metrics.update({f"actor/{k}_replay": v for k, v in rp_sums.means().items()})
    metrics["actor/grad_norm"] = float(np.mean(grad_norms)) if grad_norms else 0.0
    if replay_norms:
        metrics["actor/grad_norm_replay"] = float(np.mean(replay_norms))
    metrics["actor/skipped_steps"] = float(skipped)
    metrics["actor/replay_rows"] = float(len(replay)) if with_replay else 0.0
    return metrics
