"""Policy losses (registry by name), loss aggregation, KL penalties, entropy and the actor loss.

verl 0.9.1 compatible: the functions below have verl's names, arguments, shapes (``[B, T]`` with
``response_mask``) and results, so a verl user can swap them in (the formulas: docs/algorithm.md,
'Policy loss'). The losses take ``config``: any object with the attributes verl reads (``clip_ratio``,
``clip_ratio_low``, ``clip_ratio_high``, ``clip_ratio_c``, ``policy_loss.*``, ``global_batch_info``) -
a dataclass, ``SimpleNamespace``, pydantic model or OmegaConf ``DictConfig``.

How the losses read their constants from ``config``, and the config views a trainer passes:
:mod:`spear_engine.algorithms.loss_config`.

SPEAR additions (not in verl 0.9): :func:`replay_loss_config` (the official ``is_replay=True``
switch, expressed as a config view, defined in ``loss_config``), :func:`legacy_global_batch_info` (the aggregation of the older
verl the official SPEAR code runs on) and :func:`actor_loss` (a micro-batch's pg - entropy bonus (+ KL)).

Loss aggregation is defined once, in ``spear_kernels`` (which cannot import this package):
:func:`agg_loss` and :func:`legacy_global_batch_info` here are ``spear_kernels.agg_loss`` /
``spear_kernels.legacy_global_batch_info``, and the kernel path's per-token weights are
``spear_kernels.agg_scale`` of the same arguments.

Deliberate differences from verl 0.9, none of which changes a result for finite inputs:
* invalid hyper-parameters raise ``ValueError`` instead of failing an ``assert``;
* ``agg_loss`` ignores NaN/inf at masked positions in every mode (verl only in the token modes);
* ``compute_policy_loss_gpg`` accepts ``config=None`` (no extra aggregation kwargs).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from spear_engine.algorithms.kernel_dispatch import kernel_policy_loss, use_kernels
from spear_engine.algorithms.loss_config import (  # noqa: F401  (config_view, replay_loss_config: re-exported)
    batch_info,
    clip_range_pair,
    config_view,
    dual_clip_c,
    kernel_loss_constants,
    replay_loss_config,
)
from spear_engine.algorithms.token_ops import entropy_from_logits, masked_mean
from spear_kernels import AGG_MODES, agg_loss, legacy_global_batch_info  # noqa: F401  (re-exported: verl API)

PolicyLossFn = Callable[..., tuple[torch.Tensor, dict[str, Any]]]

POLICY_LOSS_REGISTRY: dict[str, PolicyLossFn] = {}
"""Registered policy losses by name: vanilla, clip_cov, kl_cov, gpg."""

LOSS_AGG_MODES = AGG_MODES
"""The ``loss_agg_mode`` values of verl 0.9 ``agg_loss`` (:func:`agg_loss`)."""

LOG_RATIO_CLAMP = 20.0
"""|log pi - log pi_old| is clamped to this before exp in the vanilla loss (as verl)."""


# --------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------
def register_policy_loss(name: str) -> Callable[[PolicyLossFn], PolicyLossFn]:
    """Decorator: register a policy loss under ``name`` (a later registration replaces it, as verl)."""

    def decorator(fn: PolicyLossFn) -> PolicyLossFn:
        POLICY_LOSS_REGISTRY[name] = fn
        return fn

    return decorator


def get_policy_loss_fn(name: str) -> PolicyLossFn:
    """The policy loss registered as ``name``; ValueError listing the registered names otherwise."""
    if name not in POLICY_LOSS_REGISTRY:
        raise ValueError(
            f"Unsupported loss mode: {name!r}. Supported modes are: {list(POLICY_LOSS_REGISTRY)}"
        )
    return POLICY_LOSS_REGISTRY[name]


# --------------------------------------------------------------------------------------------
# aggregation (agg_loss, legacy_global_batch_info: spear_kernels', imported above)
# --------------------------------------------------------------------------------------------
def _aggregate(
    loss_mat: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str,
    config: Any,
    rollout_is_weights: torch.Tensor | None,
) -> torch.Tensor:
    if rollout_is_weights is not None:
        loss_mat = loss_mat * rollout_is_weights
    return agg_loss(loss_mat, response_mask, loss_agg_mode, **batch_info(config))


# --------------------------------------------------------------------------------------------
# policy losses
# --------------------------------------------------------------------------------------------
@register_policy_loss("vanilla")
def compute_policy_loss_vanilla(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """PPO clip with clip-higher (eps_low, eps_high) and dual-clip for A < 0.

    ``delta = clamp(logp - logp_old, +-20)``, ``r = e^delta``; ``l = max(-A r, -A clip(r, 1-eps_l,
    1+eps_h))``, and for ``A < 0`` additionally ``min(l, -A c)``, ``c = clip_ratio_c``.
    Metrics: ``actor/pg_clipfrac`` (clipped branch strictly larger), ``actor/ppo_kl`` (mean of
    -delta), ``actor/pg_clipfrac_lower`` (dual clip active).
    """
    if config is None:
        raise ValueError("compute_policy_loss_vanilla needs a config (clip_ratio*)")
    eps_low, eps_high = clip_range_pair(config)
    clip_c = dual_clip_c(config)
    if use_kernels(log_prob):
        return kernel_policy_loss(
            "vanilla", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, batch_info(config),
            rollout_is_weights, **kernel_loss_constants("vanilla", config),
        )  # fmt: skip

    log_ratio = torch.clamp(log_prob - old_log_prob, min=-LOG_RATIO_CLAMP, max=LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    ppo_term = torch.maximum(unclipped, clipped)
    dual_bound = -advantages * clip_c
    negative = advantages < 0
    pg_losses = torch.where(negative, torch.minimum(dual_bound, ppo_term), ppo_term)

    metrics = {
        "actor/pg_clipfrac": masked_mean((clipped > unclipped).float(), response_mask).item(),
        "actor/ppo_kl": masked_mean(-log_ratio, response_mask).detach().item(),
        "actor/pg_clipfrac_lower": masked_mean(
            ((ppo_term > dual_bound) & negative).float(), response_mask
        ).item(),
    }
    return _aggregate(pg_losses, response_mask, loss_agg_mode, config, rollout_is_weights), metrics


def _clip_cov_detach_mask(
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    ppo_clipped: torch.Tensor,
    ratio: float,
    lower: float,
    upper: float,
) -> torch.Tensor:
    """1 on tokens kept, 0 on the tokens Clip-Cov detaches (same dtype as ``advantages``).

    Candidates: valid, not already PPO-clipped, ``lower < cov < upper`` with cov = (A - mean A)
    (logp - mean logp) over the valid tokens. ``max(floor(ratio * N_valid), 1)`` of them are drawn
    uniformly without replacement with one ``torch.randperm`` on the global CPU generator - the same
    draw verl makes, so seeded runs select the same tokens.
    """
    valid = response_mask > 0
    with torch.no_grad():
        logp = log_prob.detach()
        cov = (advantages - masked_mean(advantages, response_mask)) * (
            logp - masked_mean(logp, response_mask)
        )
        candidates = (cov > lower) & (cov < upper) & valid & ~ppo_clipped
    budget = max(int(ratio * response_mask.sum().item()), 1)
    positions = torch.nonzero(candidates)
    keep = torch.ones_like(advantages)
    if len(positions) > 0:
        order = torch.randperm(len(positions))
        chosen = positions[order[: min(budget, len(positions))]]
        keep[chosen[:, 0], chosen[:, 1]] = 0
    return keep


@register_policy_loss("clip_cov")
def compute_policy_loss_clip_cov(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Clip-Cov: PPO clip (no delta clamp, no dual clip), plus a random few tokens of
    high advantage/log-prob covariance get zero loss and zero gradient (they stay in the mask).

    Constants: ``policy_loss.clip_cov_ratio`` (null -> 2e-4), ``clip_cov_lb`` (1.0), ``clip_cov_ub``
    (5.0). For replay rows pass ``replay_loss_config(config)``. Metrics: ``actor/pg_clipfrac``
    (fraction of valid tokens detached), ``actor/ppo_kl``.
    """
    constants = kernel_loss_constants("clip_cov", config)
    if use_kernels(log_prob):
        return kernel_policy_loss(
            "clip_cov", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, batch_info(config),
            rollout_is_weights, **constants,
        )  # fmt: skip
    eps_low, eps_high = constants["clip_ratio_low"], constants["clip_ratio_high"]
    ratio_c, lower, upper = constants["clip_cov_ratio"], constants["clip_cov_lb"], constants["clip_cov_ub"]

    log_ratio = log_prob - old_log_prob
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    ppo_clipped = clipped > unclipped
    keep = _clip_cov_detach_mask(log_prob, advantages, response_mask, ppo_clipped, ratio_c, lower, upper)
    pg_losses = torch.maximum(unclipped, clipped) * keep

    metrics = {
        "actor/pg_clipfrac": masked_mean((keep == 0).float(), response_mask).item(),
        "actor/ppo_kl": masked_mean(-log_ratio, response_mask).detach().item(),
    }
    return _aggregate(pg_losses, response_mask, loss_agg_mode, config, rollout_is_weights), metrics


def _kl_cov_select(
    log_prob: torch.Tensor, advantages: torch.Tensor, response_mask: torch.Tensor, ratio: float
):
    """Bool ``[B, T]``: the ``max(1, floor(ratio * N_valid))`` valid tokens of largest covariance
    (A - mean A)(logp - mean logp), means over the valid tokens; computed on CPU as verl does."""
    valid = response_mask > 0
    selected = torch.zeros(valid.numel(), dtype=torch.bool)
    flat_valid = torch.nonzero(valid.reshape(-1).cpu(), as_tuple=True)[0]
    if flat_valid.numel() > 0:
        adv = advantages[valid].detach().reshape(-1).cpu()
        logp = log_prob[valid].detach().reshape(-1).cpu()
        cov = (adv - adv.mean()) * (logp - logp.mean())
        count = max(1, int(len(cov) * ratio))
        top = torch.topk(cov, count, largest=True).indices
        selected[flat_valid[top]] = True
    return selected.reshape(valid.shape).to(valid.device)


@register_policy_loss("kl_cov")
def compute_policy_loss_kl_cov(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """KL-Cov: ``-A r`` with no clipping; the top ``kl_cov_ratio`` fraction of valid
    tokens by covariance add ``beta |logp - logp_old|``, ``beta = policy_loss.ppo_kl_coef``.

    Constants: ``kl_cov_ratio`` (null -> 2e-4), ``ppo_kl_coef`` (null -> 1.0). Metric
    ``actor/ppo_kl`` is the masked mean of ``|delta|``.
    """
    constants = kernel_loss_constants("kl_cov", config)
    if use_kernels(log_prob):
        return kernel_policy_loss(
            "kl_cov", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, batch_info(config),
            rollout_is_weights, **constants,
        )  # fmt: skip
    ratio_k, beta = constants["kl_cov_ratio"], constants["ppo_kl_coef"]

    log_ratio = log_prob - old_log_prob
    abs_log_ratio = log_ratio.abs()
    ratio = torch.exp(log_ratio)
    plain = -advantages * ratio
    penalised = -advantages * ratio + beta * abs_log_ratio
    selected = _kl_cov_select(log_prob, advantages, response_mask, ratio_k)
    pg_losses = torch.where(selected, penalised, plain)

    metrics = {"actor/ppo_kl": masked_mean(abs_log_ratio, response_mask).detach().item()}
    return _aggregate(pg_losses, response_mask, loss_agg_mode, config, rollout_is_weights), metrics


@register_policy_loss("gpg")
def compute_policy_loss_gpg(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """GPG: ``-A logp``, no ratio and no clipping; no metrics (``{}`` as verl 0.9)."""
    if use_kernels(log_prob):
        return kernel_policy_loss(
            "gpg", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, batch_info(config),
            rollout_is_weights,
        )  # fmt: skip
    pg_losses = -log_prob * advantages
    return _aggregate(pg_losses, response_mask, loss_agg_mode, config, rollout_is_weights), {}


# --------------------------------------------------------------------------------------------
# KL penalty, entropy, actor loss
# --------------------------------------------------------------------------------------------
KL_PENALTY_KINDS = ("kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3")
"""Estimators of KL(pi || ref) per token; each also exists with a "+" suffix."""


def kl_penalty_forward(logprob: torch.Tensor, ref_logprob: torch.Tensor, kl_penalty: str) -> torch.Tensor:
    """Per-token KL estimate with ``delta = logprob - ref_logprob``.

    ``kl``/``k1``: delta; ``abs``: |delta|; ``mse``/``k2``: delta^2 / 2; ``low_var_kl``/``k3``:
    ``e^{-delta} + delta - 1`` with ``-delta`` clamped to +-20 and the result to [-10, 10];
    ``full`` (needs full-vocabulary logits) and unknown kinds raise NotImplementedError.
    """
    if kl_penalty in ("kl", "k1"):
        return logprob - ref_logprob
    if kl_penalty == "abs":
        return (logprob - ref_logprob).abs()
    if kl_penalty in ("mse", "k2"):
        return 0.5 * (logprob - ref_logprob).square()
    if kl_penalty in ("low_var_kl", "k3"):
        neg_delta = torch.clamp(ref_logprob - logprob, min=-20, max=20)
        return torch.clamp(torch.exp(neg_delta) - neg_delta - 1, min=-10, max=10)
    if kl_penalty == "full":
        raise NotImplementedError("kl_penalty 'full' needs full-vocabulary logits; not implemented")
    raise NotImplementedError(
        f"unknown kl_penalty {kl_penalty!r}; expected one of {list(KL_PENALTY_KINDS)} (+ '+')"
    )


def kl_penalty(logprob: torch.Tensor, ref_logprob: torch.Tensor, kl_penalty: str) -> torch.Tensor:
    """KL estimate of kind ``kl_penalty``. A trailing "+" (e.g. ``k3+``) keeps the value of the kind
    but takes the gradient of ``k2`` (straight-through), whose expected gradient is the true KL's."""
    straight_through = kl_penalty.endswith("+")
    value = kl_penalty_forward(logprob, ref_logprob, kl_penalty[:-1] if straight_through else kl_penalty)
    if not straight_through:
        return value
    surrogate = 0.5 * (logprob - ref_logprob).square()
    return surrogate - surrogate.detach() + value.detach()


def compute_entropy_loss(
    logits: torch.Tensor, response_mask: torch.Tensor, loss_agg_mode: str = "token-mean"
) -> torch.Tensor:
    """Aggregated token entropy of ``softmax(logits)`` (``[B, T, V]`` -> scalar)."""
    return agg_loss(entropy_from_logits(logits), response_mask, loss_agg_mode)


def actor_loss(
    pg_loss: torch.Tensor,
    entropy_agg: torch.Tensor | None,
    entropy_coeff: float,
    kl_agg: torch.Tensor | None = None,
    kl_coef: float = 0.0,
) -> torch.Tensor:
    """The micro-batch actor objective: ``pg - entropy_coeff * H (+ kl_coef * KL)``.

    As the official actor, the entropy term is skipped when ``entropy_coeff == 0`` (``entropy_agg``
    may then be None) and the KL term when ``kl_agg`` is None. Scaling by 1/grad_accum and by the
    replay coefficient c(t) is the trainer's job.
    """
    loss = pg_loss
    if entropy_coeff != 0:
        if entropy_agg is None:
            raise ValueError("entropy_coeff != 0 needs entropy_agg")
        loss = loss - entropy_agg * entropy_coeff
    if kl_agg is not None:
        loss = loss + kl_agg * kl_coef
    return loss
