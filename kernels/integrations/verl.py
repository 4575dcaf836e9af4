"""verl adapter: spear_kernels' fused policy losses in verl's policy-loss registry (verl 0.9).

Importing this module registers four losses with verl's ``register_policy_loss``
(``verl.trainer.ppo.core_algos``), under names of their own so verl's built-ins stay untouched:

=================  =====================================================================
name               verl built-in it reproduces (same config fields, fallbacks, metrics)
=================  =====================================================================
``spear_vanilla``  ``vanilla``: PPO clip with clip-higher (``clip_ratio_low/high``) and dual-clip
                   (``clip_ratio_c``), log-ratio clamped to ±20
``spear_clip_cov`` ``clip_cov``: ``policy_loss.clip_cov_ratio / clip_cov_lb / clip_cov_ub``
``spear_kl_cov``   ``kl_cov``: ``policy_loss.kl_cov_ratio / ppo_kl_coef``
``spear_gpg``      ``gpg``: ``-A·log_prob``
=================  =====================================================================

Each has verl's policy-loss signature ``fn(old_log_prob, log_prob, advantages, response_mask,
loss_agg_mode="token-mean", config=None, rollout_is_weights=None) -> (pg_loss, pg_metrics)``, reads
``config`` (verl's ``ActorConfig`` or a DictConfig) as verl's function of the same mode does,
aggregates with ``loss_agg_mode`` and ``config.global_batch_info`` (``dp_size``, ``batch_num_tokens``,
``global_batch_size``, ``loss_scale_factor``, which verl's ``ppo_loss`` fills per micro-batch), multiplies
the per-token loss by ``rollout_is_weights`` and returns verl's metrics (``actor/pg_clipfrac``,
``actor/ppo_kl``, ``actor/pg_clipfrac_lower`` as the mode defines them; ``{}`` for gpg) as floats.

What differs from verl's built-ins (``spear_kernels.policy_loss`` does the work):

* the loss and ``dL/dlog_prob`` come from one pass (a Triton kernel on CUDA, a torch path on CPU); the
  backward only scales the stored gradient;
* Clip-Cov / KL-Cov select their tokens on the device: no ``nonzero``, CPU ``randperm`` / ``topk`` or
  ``.item()`` in the selection, where verl's synchronise with the host (the metrics are still floats at
  the end, as verl's ``Metric`` takes them). Clip-Cov draws its random subset from the device's default
  generator (seed with ``torch.manual_seed``), not from the CPU ``randperm`` stream, so for the same seed
  it may detach other tokens than verl does (the same distribution); when the budget covers every
  candidate the two are identical;
* all arithmetic is fp32: for bf16 / fp16 ``log_prob`` the loss is an fp32 scalar (verl's is in the input
  dtype, with its rounding) and the gradient comes back in ``log_prob``'s dtype;
* a micro-batch with no valid token gives a loss of 0 (verl: 0 / 0 = NaN in the mean modes).

Selecting them in verl: the registry lives in each process, so every process that computes the actor
loss (the Ray workers) must import this module. verl 0.9 imports ``model.external_lib`` in each worker
when it builds the model config, so two config keys suffice::

    python -m verl.trainer.main_ppo ... \\
        actor_rollout_ref.model.external_lib=spear_kernels.integrations.verl \\
        actor_rollout_ref.actor.policy_loss.loss_mode=spear_clip_cov

(or set ``VERL_USE_EXTERNAL_MODULES=spear_kernels.integrations.verl`` in the workers' environment, which
verl's ``__init__`` imports; or ``import spear_kernels.integrations.verl`` in your own worker code).

Without verl this module cannot register anything and its import raises ImportError; spear_kernels
itself never imports it. :func:`make_policy_loss` builds one of the functions without registering it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..loss_config import global_batch_info, loss_constants
from ..policy_loss import policy_loss
from ..utils import Backend

SPEAR_POLICY_LOSSES: dict[str, str] = {
    "spear_vanilla": "vanilla",
    "spear_clip_cov": "clip_cov",
    "spear_kl_cov": "kl_cov",
    "spear_gpg": "gpg",
}
"""verl ``policy_loss.loss_mode`` name -> spear_kernels ``loss_mode`` (verl's built-in of the same formula)."""

PolicyLossFn = Callable[..., tuple[torch.Tensor, dict[str, Any]]]


def make_policy_loss(loss_mode: str, backend: Backend = "auto") -> PolicyLossFn:
    """A verl policy-loss function computing ``loss_mode`` (vanilla | clip_cov | kl_cov | gpg) with
    ``spear_kernels.policy_loss``; ``backend`` as there (``auto``: Triton for CUDA tensors)."""
    if loss_mode not in SPEAR_POLICY_LOSSES.values():
        raise ValueError(f"unknown loss_mode {loss_mode!r}; expected one of {tuple(SPEAR_POLICY_LOSSES.values())}")

    def compute_policy_loss(
        old_log_prob: torch.Tensor,
        log_prob: torch.Tensor,
        advantages: torch.Tensor,
        response_mask: torch.Tensor,
        loss_agg_mode: str = "token-mean",
        config: Any = None,
        rollout_is_weights: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        constants = loss_constants(loss_mode, config)
        out = policy_loss(
            log_prob, old_log_prob, advantages, response_mask, loss_mode=loss_mode, loss_agg_mode=loss_agg_mode,
            weights=rollout_is_weights, backend=backend, **constants, **global_batch_info(config),
        )  # fmt: skip
        if loss_mode == "gpg":
            return out.loss, {}
        if loss_mode == "kl_cov":
            return out.loss, {"actor/ppo_kl": out.ppo_kl.item()}
        if loss_mode == "vanilla":  # the kernel's ppo_kl is verl's: the mean of the clamped log-ratio
            return out.loss, {"actor/pg_clipfrac": out.pg_clipfrac.item(), "actor/ppo_kl": out.ppo_kl.item(),
                              "actor/pg_clipfrac_lower": out.pg_clipfrac_lower.item()}  # fmt: skip
        return out.loss, {"actor/pg_clipfrac": out.pg_clipfrac.item(), "actor/ppo_kl": out.ppo_kl.item()}

    compute_policy_loss.__name__ = compute_policy_loss.__qualname__ = f"compute_policy_loss_spear_{loss_mode}"
    compute_policy_loss.__doc__ = (
        f"verl policy loss {loss_mode!r} computed by spear_kernels.policy_loss (fused loss + gradient; "
        f"see spear_kernels.integrations.verl)."
    )
    return compute_policy_loss


def register_spear_losses(
    register_policy_loss: Callable[[str], Callable[[PolicyLossFn], PolicyLossFn]] | None = None,
    backend: Backend = "auto",
) -> dict[str, PolicyLossFn]:
    """Register :data:`SPEAR_POLICY_LOSSES` with verl's ``register_policy_loss`` (default: the one of
    ``verl.trainer.ppo.core_algos``); idempotent. Returns ``{name: function}``."""
    if register_policy_loss is None:
        try:
            from verl.trainer.ppo.core_algos import register_policy_loss
        except ImportError as e:
            raise ImportError(
                "spear_kernels.integrations.verl registers its losses in verl's policy-loss registry and needs "
                f"verl (>= 0.9) importable: {e}"
            ) from e
    registered = {}
    for name, loss_mode in SPEAR_POLICY_LOSSES.items():
        registered[name] = register_policy_loss(name)(make_policy_loss(loss_mode, backend=backend))
    return registered


REGISTERED = register_spear_losses()
"""The functions registered at import, by name."""
