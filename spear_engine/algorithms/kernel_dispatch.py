"""Dispatch of the verl-style token functions and policy losses to the fused kernels (``spear_kernels``).

CUDA tensors go to the Triton kernels (one pass for the per-token loss and its gradient, Clip-Cov /
KL-Cov selection on device); CPU tensors stay on the torch implementation of this package, which is
bit-compatible with verl 0.9. ``SPEAR_LOSS_BACKEND=kernels`` forces the kernel path on CPU too (its
chunked torch implementation, or Triton under ``TRITON_INTERPRET=1`` with
``SPEAR_KERNELS_BACKEND=triton``); ``=torch`` forces the torch path everywhere.

The kernel path keeps verl's aggregation exactly by turning ``agg_loss``'s normalisation (with the
``global_batch_info`` kwargs) into per-token weights of a token-sum, so global token / sequence counts
across ranks work unchanged. Differences, all on degenerate input: a micro-batch whose mask is empty
gives a loss of 0 instead of NaN (token-mean, seq-mean-token-mean), and Clip-Cov draws its tokens from
the device generator, not from ``torch.randperm`` on the CPU generator (same distribution, different
stream).
"""

from __future__ import annotations

import os
from typing import Any

import torch

LOSS_BACKEND_ENV = "SPEAR_LOSS_BACKEND"


def use_kernels(tensor: torch.Tensor) -> bool:
    """True when ``tensor`` should take the ``spear_kernels`` path (see the module docstring)."""
    choice = os.environ.get(LOSS_BACKEND_ENV, "auto")
    if choice == "kernels":
        return True
    if choice == "torch":
        return False
    if choice != "auto":
        raise ValueError(f"{LOSS_BACKEND_ENV}={choice!r}; expected auto, kernels or torch")
    return tensor.is_cuda


def verl_token_scale(
    mask: torch.Tensor,
    loss_agg_mode: str,
    dp_size: int = 1,
    batch_num_tokens: int | torch.Tensor | None = None,
    global_batch_size: int | torch.Tensor | None = None,
    loss_scale_factor: float | None = None,
) -> torch.Tensor:
    """Per-token factor s with ``agg_loss(l, mask, mode, **info) == sum(s * l)`` (verl 0.9 semantics)."""
    m = mask.float()
    if loss_agg_mode == "token-mean":
        count = m.sum() if batch_num_tokens is None else batch_num_tokens
        return m / count * dp_size
    if loss_agg_mode == "token-sum":
        return m * dp_size
    if loss_agg_mode in ("seq-mean-token-sum", "seq-mean-token-sum-norm", "seq-mean-token-mean"):
        per_row = m.sum(-1, keepdim=True)
        rows = (per_row > 0).float().sum() if global_batch_size is None else global_batch_size
        scale = m / rows * dp_size
        if loss_agg_mode == "seq-mean-token-mean":
            scale = scale / (per_row + 1e-8)
        if loss_agg_mode == "seq-mean-token-sum-norm":
            scale = scale / (m.shape[-1] if loss_scale_factor is None else loss_scale_factor)
        return scale
    raise ValueError(f"Invalid loss_agg_mode: {loss_agg_mode!r}")


def kernel_policy_loss(
    loss_mode: str,
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str,
    batch_info: dict[str, Any],
    rollout_is_weights: torch.Tensor | None,
    **constants: float,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The verl-style ``(loss, metrics)`` of ``loss_mode`` computed by ``spear_kernels.policy_loss``."""
    import spear_kernels

    weights = verl_token_scale(response_mask, loss_agg_mode, **batch_info)
    if rollout_is_weights is not None:
        weights = weights * rollout_is_weights
    out = spear_kernels.policy_loss(
        log_prob, old_log_prob, advantages, response_mask,
        loss_mode=loss_mode, loss_agg_mode="token-sum", weights=weights, **constants,
    )  # fmt: skip
    return out.loss, kernel_loss_metrics(loss_mode, out)


def kernel_loss_metrics(loss_mode: str, out: Any) -> dict[str, float]:
    """The verl metrics of ``loss_mode`` from a ``spear_kernels.PolicyLossOutput`` (as the torch losses name them)."""
    if loss_mode == "gpg":
        return {}
    if loss_mode == "kl_cov":
        return {"actor/ppo_kl": out.ppo_kl.item()}
    metrics = {"actor/pg_clipfrac": out.pg_clipfrac.item(), "actor/ppo_kl": out.ppo_kl.item()}
    if loss_mode == "vanilla":
        metrics["actor/pg_clipfrac_lower"] = out.pg_clipfrac_lower.item()
    return metrics


def kernel_logprob_entropy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (logp, entropy) of ``[..., V]`` logits by ``spear_kernels.logprob_entropy``, shaped ``[...]``."""
    import spear_kernels

    lead, vocab = logits.shape[:-1], logits.shape[-1]
    logp, entropy = spear_kernels.logprob_entropy(logits.reshape(-1, vocab), labels.reshape(-1).long())
    return logp.reshape(lead), entropy.reshape(lead)
