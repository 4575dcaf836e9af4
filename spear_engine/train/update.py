"""The actor update: on-policy mini-batches, then the self-imitation replay.

``update_actor`` is model-agnostic: it takes a ``forward(rows) -> (log_probs, entropy)`` callable
over a row selection, so the same loop drives a transformer (the trainer) or the toy policy of
``spear demo``. Replay rows use the same loss function with the replay constants
(``replay_loss_config``), their stored behaviour log-probs as ``old_log_prob``, their recalibrated
advantages, no KL, and the loss scaled by c(t):

* ``replay_update=sequential`` (official): after the on-policy mini-batches, one optimizer step per
  replay mini-batch;
* ``replay_update=joint`` (paper): the replay rows are spread over the on-policy mini-batches and
  each optimizer step takes the on-policy loss plus c(t) times the replay loss.

Semantics: docs/algorithm.md, 'Replay in the update', 'Loss aggregation' and 'Actor objective'.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from spear_engine.algorithms.kernel_dispatch import kernel_loss_metrics
from spear_engine.algorithms.loss_config import config_view, kernel_loss_constants, replay_loss_config
from spear_engine.algorithms.losses import (
    actor_loss,
    agg_loss,
    get_policy_loss_fn,
    kl_penalty,
    legacy_global_batch_info,
)
from spear_engine.config import ActorConfig
from spear_engine.train.prefix_tree import shared_prefix_chunks
from spear_kernels import agg_scale

Forward = Callable[[np.ndarray, "LossRows"], tuple[torch.Tensor, torch.Tensor]]
"""forward(row_indices, rows) -> (log_probs [b, W], entropy [b, W]) with gradients."""


@dataclass
class LossRows:
    """Rows for the policy loss, all [N, W] and aligned: position k of row i is one token."""

    inputs: Any
    """Whatever ``forward`` needs to rebuild row i (token ids, ...); indexed by ``forward`` itself."""
    old_log_prob: torch.Tensor | None
    """Behaviour log-probs; None when the update is exactly on-policy: each row's first forward (before
    any optimizer step) is then its old log-prob, and is kept in ``forward_log_prob``."""
    advantages: torch.Tensor
    loss_mask: torch.Tensor
    weights: torch.Tensor | None = None
    """Per-token importance weights of the policy loss (rollout/trainer mismatch correction), or None."""
    ref_log_prob: torch.Tensor | None = None
    """Reference-policy log-probs for the KL loss (``actor.use_kl_loss``), or None."""
    tokens: torch.Tensor | None = None
    """Tokens the forward processes per row, for token-budget micro-batches (``actor.use_dynamic_bsz``);
    None: micro-batches of ``ppo_micro_batch_size_per_gpu`` rows."""
    row_ids: list[list[int]] | None = None
    """Each row's real token ids when the forward runs a prefix shared by rows once (``actor.share_prefixes``):
    micro-batches then gather rows with common prefixes and count a shared token once; None: rows as they come."""
    forward_log_prob: torch.Tensor | None = None
    """With ``old_log_prob=None``: the detached log-probs of each row's forward, filled by the update."""
    forward_entropy: torch.Tensor | None = None
    _seen: np.ndarray | None = field(default=None, init=False, repr=False)

    def __len__(self) -> int:
        return int(self.loss_mask.shape[0])

    def to(self, device: torch.device | str) -> LossRows:
        """The per-token tensors on ``device`` (``inputs`` is moved by the forward, micro-batch by micro-batch)."""

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return LossRows(self.inputs, move(self.old_log_prob), move(self.advantages), move(self.loss_mask),  # type: ignore[arg-type]
                        move(self.weights), move(self.ref_log_prob), self.tokens, self.row_ids)  # fmt: skip

    def old_log_probs_of(
        self, idx: np.ndarray, log_probs: torch.Tensor, entropy: torch.Tensor
    ) -> torch.Tensor:
        """``old_log_prob[idx]``, or (on-policy) this forward's own log-probs, recorded for the caller."""
        if self.old_log_prob is not None:
            return self.old_log_prob[idx]
        if self.forward_log_prob is None:
            self.forward_log_prob = torch.zeros(self.loss_mask.shape, dtype=torch.float32)
            self.forward_entropy = torch.zeros(self.loss_mask.shape, dtype=torch.float32)
            self._seen = np.zeros(len(self), dtype=bool)
        assert self._seen is not None
        if self._seen[idx].any():
            raise RuntimeError("old_log_prob=None needs every row forwarded exactly once, before any optimizer "
                               "step (one epoch, one mini-batch); this update forwarded a row twice")  # fmt: skip
        self._seen[idx] = True
        detached = log_probs.detach()
        self.forward_log_prob[torch.as_tensor(idx)] = detached.float().cpu()
        self.forward_entropy[torch.as_tensor(idx)] = entropy.detach().float().cpu()  # type: ignore[index]
        return detached


def token_budget_chunks(tokens: np.ndarray, budget: int) -> list[np.ndarray]:
    """Consecutive positions grouped so each group's tokens stay within ``budget`` (a longer row alone).

    verl's ``use_dynamic_bsz`` balances the groups; here the order is kept (rows of a group are contiguous
    in the mini-batch) and each group is filled greedily, which is what bounds the memory of a forward."""
    chunks: list[np.ndarray] = []
    start, used = 0, 0
    for i, n in enumerate(tokens.tolist()):
        if i > start and used + n > budget:
            chunks.append(np.arange(start, i))
            start, used = i, 0
        used += n
    if len(tokens):
        chunks.append(np.arange(start, len(tokens)))
    return chunks


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


def _fused_micro_loss(
    forward: Any, rows: LossRows, idx: np.ndarray, config: ActorConfig, loss_config: Any
) -> tuple[torch.Tensor, dict[str, float]]:
    """:func:`_micro_loss` through the fused head + loss kernel: ``forward(idx, rows, TokenLoss)`` returns
    ``(log_probs, entropy, PolicyLossOutput)``. Same objective and metrics (Clip-Cov draws its tokens from
    the kernel's generator stream instead of ``torch.randperm``)."""
    from spear_engine.train.policy import TokenLoss

    mode = config.policy_loss.loss_mode
    mask = rows.loss_mask[idx]
    scale = agg_scale(mask, config.loss_agg_mode, **loss_config.global_batch_info)
    weights = scale if rows.weights is None else scale * rows.weights[idx]
    old = None if rows.old_log_prob is None else rows.old_log_prob[idx]
    spec = TokenLoss(old, rows.advantages[idx], mask, weights, scale, mode, kernel_loss_constants(mode, loss_config),
                     config.entropy_coeff)  # fmt: skip
    log_probs, entropy, result = forward(idx, rows, spec)
    if old is None:
        rows.old_log_probs_of(idx, log_probs, entropy)  # records this first forward as the old policy
    entropy_agg = float((entropy.detach() * scale).sum())
    out = {k.removeprefix("actor/"): float(v) for k, v in kernel_loss_metrics(mode, result).items()}
    out["pg_loss"] = float(result.loss.detach()) + config.entropy_coeff * entropy_agg
    out["entropy"] = float((entropy.detach() * mask).sum() / mask.sum().clamp_min(1))
    return result.loss, out


def _micro_loss(
    forward: Forward, rows: LossRows, idx: np.ndarray, config: ActorConfig, loss_config: Any, fused: bool = False
) -> tuple[torch.Tensor, dict[str, float]]:
    """The actor objective of one micro-batch (pg - entropy_coeff * H (+ KL)) and its metrics; ``fused``:
    through the forward's fused loss, except with a KL loss term (the kernel has none)."""
    if fused and not (config.use_kl_loss and rows.ref_log_prob is not None):
        return _fused_micro_loss(forward, rows, idx, config, loss_config)
    log_probs, entropy = forward(idx, rows)
    old_log_prob = rows.old_log_probs_of(idx, log_probs, entropy)
    mask = rows.loss_mask[idx]
    loss_fn = get_policy_loss_fn(config.policy_loss.loss_mode)
    weights = None if rows.weights is None else rows.weights[idx]
    pg_loss, metrics = loss_fn(
        old_log_prob, log_probs, rows.advantages[idx], mask, config.loss_agg_mode, loss_config, weights
    )
    info = loss_config.global_batch_info
    entropy_agg = agg_loss(entropy, mask, config.loss_agg_mode, **info) if config.entropy_coeff else None
    kl_agg = None
    if config.use_kl_loss and rows.ref_log_prob is not None:
        kl = kl_penalty(log_probs, rows.ref_log_prob[idx], config.kl_loss_type)
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
    micros = micro_batches(part.rows.tokens, part.mini, config, part.rows.row_ids)
    tokens, rows = _global_counts(part.rows.loss_mask[part.mini], world_size)
    mini_info = {"batch_num_tokens": tokens, "global_batch_size": rows, "dp_size": world_size}
    plan = []
    for idx in micros:
        if config.legacy_agg_loss:  # grad accumulation: / #micros, or each micro's share of the rows (verl)
            info = legacy_global_batch_info(config.loss_agg_mode, part.rows.loss_mask[idx])
            share = (
                len(idx) / len(part.mini)
                if part.rows.tokens is not None and config.use_dynamic_bsz
                else 1 / len(micros)
            )
        else:
            info, share = mini_info, 1.0
        plan.append((idx, config_view(part.loss_config, global_batch_info=info), part.scale * share))
    return plan


def micro_batches(
    tokens: torch.Tensor | None, mini: np.ndarray, config: ActorConfig, row_ids: list[list[int]] | None = None
) -> list[np.ndarray]:
    """The row indices of each forward of a mini-batch: up to ``ppo_max_token_len_per_gpu`` tokens with
    ``use_dynamic_bsz`` (and known row lengths ``tokens``), else ``ppo_micro_batch_size_per_gpu`` rows.
    With ``row_ids`` (a prefix-sharing forward), rows are ordered by their tokens first and, with a token
    budget, a prefix shared within a micro-batch counts once (:func:`shared_prefix_chunks`)."""
    if row_ids is not None:
        rows = [row_ids[i] for i in mini.tolist()]
        if config.use_dynamic_bsz:
            return [mini[c] for c in shared_prefix_chunks(rows, config.ppo_max_token_len_per_gpu)]
        ordered = mini[np.array(sorted(range(len(rows)), key=rows.__getitem__), dtype=np.int64)]
        return [ordered[c] for c in _chunks(len(ordered), config.ppo_micro_batch_size_per_gpu)]
    if config.use_dynamic_bsz and tokens is not None:
        lengths = tokens[torch.as_tensor(mini)].numpy()
        return [mini[c] for c in token_budget_chunks(lengths, config.ppo_max_token_len_per_gpu)]
    return [mini[c] for c in _chunks(len(mini), config.ppo_micro_batch_size_per_gpu)]


def _optimizer_step(
    backend: Any, forward: Forward, config: ActorConfig, parts: list[_Part], fused: bool = False
) -> tuple[float, bool]:
    """Backward over every micro-batch of ``parts``, then one optimizer step.

    A non-finite micro-batch loss (on any rank) discards the accumulated gradients and skips the step,
    so weights and optimizer state stay as they were; a non-finite gradient norm is skipped by the backend.
    """
    world_size = getattr(backend, "world_size", 1)
    plan = [(part, *micro) for part in parts for micro in _micro_plan(part, config, world_size)]
    finite = True
    for k, (part, idx, loss_config, factor) in enumerate(plan):
        loss, metrics = _micro_loss(forward, part.rows, idx, config, loss_config, fused)
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
    fused: bool = False,
) -> dict[str, float]:
    """PPO epochs over the on-policy rows, plus the replay rows scaled by ``replay_coef`` (c(t)).

    ``backend`` offers ``backward(loss, boundary)``, ``step() -> (grad_norm, stepped)`` and
    ``discard_gradients()`` (:mod:`spear_engine.train.backends`). ``fused``: ``forward`` also takes a
    :class:`~spear_engine.train.policy.TokenLoss` and returns the loss with the log-probs (the fused path).
    """
    replay_cfg = replay_loss_config(config) if config.policy_loss.replay_uses_replay_params else config
    with_replay = replay is not None and len(replay) > 0 and replay_coef > 0
    on_sums, rp_sums = _MetricSums(), _MetricSums()
    grad_norms, replay_norms, skipped = [], [], 0
    generator = np.random.default_rng(shuffle_seed)
    if on_policy.old_log_prob is None and (
        config.ppo_epochs > 1 or len(on_policy) > config.ppo_mini_batch_size
    ):
        raise ValueError("on-policy rows without old_log_prob need one epoch and one mini-batch (the update's "
                         "first forward is the old policy); compute old log-probs first")  # fmt: skip
    for _ in range(config.ppo_epochs):
        order = (
            generator.permutation(len(on_policy)) if shuffle_seed is not None else np.arange(len(on_policy))
        )
        minis = [order[m] for m in _chunks(len(on_policy), config.ppo_mini_batch_size)]
        replay_parts: list[np.ndarray] = []
        if with_replay and replay_update == "joint":
            replay_parts = np.array_split(np.arange(len(replay)), len(minis))
        for i, mini in enumerate(minis):
            parts = [_Part(on_policy, mini, config, 1.0, on_sums)]
            if replay_parts and len(replay_parts[i]):
                parts.append(_Part(replay, replay_parts[i], replay_cfg, replay_coef, rp_sums))
            norm, ok = _optimizer_step(backend, forward, config, parts, fused)
            grad_norms.append(norm)
            skipped += not ok
        if with_replay and replay_update == "sequential":
            for mini in _chunks(len(replay), config.ppo_mini_batch_size):
                part = _Part(replay, mini, replay_cfg, replay_coef, rp_sums)
                norm, ok = _optimizer_step(backend, forward, config, [part], fused)
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
