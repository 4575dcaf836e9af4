"""Dispatch of the verl-style policy losses to the fused kernels (``spear_kernels``).

One switch picks the implementation, ``SPEAR_KERNELS_BACKEND`` (``spear_kernels.BACKEND_ENV``), read by
the kernels and by this module alike: a tensor that the kernels would run through Triton (``auto``: a
CUDA tensor; ``triton``: any tensor, CPU ones under ``TRITON_INTERPRET=1``) takes the kernel path, one
pass for the per-token loss and its gradient, Clip-Cov / KL-Cov selection on device; any other tensor
(``auto`` on CPU, or ``torch`` everywhere) stays on the torch implementation of this package, which is
bit-compatible with verl 0.9. ``SPEAR_LOSS_BACKEND`` (``auto`` | ``kernels`` | ``torch``) is the
deprecated older switch of this module alone; it still works (``kernels``: the kernel path on every
tensor, with the kernels' own backend choice) and warns.

The kernel path keeps verl's aggregation exactly: ``spear_kernels.agg_scale`` turns ``agg_loss``'s
normalisation (with the ``global_batch_info`` kwargs) into per-token weights of a token-sum, so global
token / sequence counts across ranks work unchanged. Differences, all on degenerate input: a micro-batch
whose mask is empty gives a loss of 0 instead of NaN (token-mean, seq-mean-*), and Clip-Cov draws its
tokens from the device generator, not from ``torch.randperm`` on the CPU generator (same distribution,
different stream).
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch

import spear_kernels
from spear_kernels.utils import use_triton

BACKEND_ENV = spear_kernels.BACKEND_ENV
"""``SPEAR_KERNELS_BACKEND``: auto | triton | torch, the one backend switch of the project."""
LEGACY_LOSS_BACKEND_ENV = "SPEAR_LOSS_BACKEND"
"""Deprecated: auto | kernels | torch, the loss functions' own switch before ``SPEAR_KERNELS_BACKEND``."""


def use_kernels(tensor: torch.Tensor) -> bool:
    """True when ``tensor`` should take the ``spear_kernels`` path (see the module docstring)."""
    legacy = os.environ.get(LEGACY_LOSS_BACKEND_ENV)
    if legacy is not None:
        warnings.warn(
            f"{LEGACY_LOSS_BACKEND_ENV} is deprecated: set {BACKEND_ENV}=triton (kernel path) or =torch "
            f"(torch path) instead", DeprecationWarning, stacklevel=2,
        )  # fmt: skip
        if legacy not in ("auto", "kernels", "torch"):
            raise ValueError(f"{LEGACY_LOSS_BACKEND_ENV}={legacy!r}; expected auto, kernels or torch")
        return legacy == "kernels" or (legacy == "auto" and tensor.is_cuda)  # exactly as before
    return use_triton(tensor)


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
    weights = spear_kernels.agg_scale(response_mask, loss_agg_mode, **batch_info)
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
