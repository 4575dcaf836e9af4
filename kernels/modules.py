"""Drop-in ``nn.Module`` front ends of the fused ops, for trainers other than spear_engine.

Why: a trainer that owns its model and its loop wants one object, configured once with the loss's
hyper-parameters, that it calls with tensors (the way Liger-Kernel's ``LigerFusedLinearGRPOLoss`` is
used). These modules hold no parameters and implement no math: they check and normalise their inputs
(sequence-level advantages, ``ignore_index`` labels, SIL row weights, mixed dtypes) and call
:func:`~spear_kernels.fused_linear_policy_loss` / :func:`~spear_kernels.linear_logprob_entropy`.

* :class:`FusedLinearPolicyLoss` — last hidden states + lm_head weight + labels + advantages (+ old
  log-probs, mask) → :class:`~spear_kernels.PolicyLossOutput`: the loss (gradients to hidden, weight,
  bias), per-token log-probs and entropy, clip fractions and ``ppo_kl``, without [N, V] logits.
* :class:`LinearLogprobEntropy` — hidden + lm_head weight + labels → per-token (log-prob, entropy).
"""

from __future__ import annotations

import contextlib

import torch

from .linear_logprob_entropy import linear_logprob_entropy
from .policy_loss import LOSS_MODES, PolicyLossOutput, fused_linear_policy_loss
from .utils import AGG_MODES, Backend

BACKWARD_MODES = ("in_forward", "recompute")


def head_operands(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(hidden, weight, bias) in the one dtype the fused ops need: the autocast dtype when autocast is on
    for ``hidden``'s device, else ``hidden``'s dtype. The casts are differentiable, so an fp32 master
    weight gets its gradient through them."""
    device_type = hidden.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
    hidden = hidden if hidden.dtype == dtype else hidden.to(dtype)
    weight = weight if weight.dtype == dtype else weight.to(dtype)
    if bias is not None and bias.dtype != dtype:
        bias = bias.to(dtype)
    return hidden, weight, bias


def no_autocast(t: torch.Tensor):
    """The kernels pick their own precisions: run them with autocast off for ``t``'s device."""
    try:
        return torch.autocast(t.device.type, enabled=False)
    except RuntimeError:  # a device type autocast does not know
        return contextlib.nullcontext()


def _per_token(name: str, t: torch.Tensor | None, labels: torch.Tensor) -> torch.Tensor | None:
    """A [B] (per sequence) or [B, L] tensor as [B, L]."""
    if t is None:
        return None
    if t.dim() == labels.dim() - 1 and t.shape == labels.shape[:-1]:
        t = t.unsqueeze(-1)
    try:
        return torch.broadcast_to(t, labels.shape)
    except RuntimeError as e:
        raise ValueError(f"{name} must be [B] or [B, L] = {tuple(labels.shape)}, got {tuple(t.shape)}") from e


class FusedLinearPolicyLoss(torch.nn.Module):
    """The engine's PPO-family policy loss fused with the lm_head: no [N, V] logits, forward and backward in
    one pass (``spear_kernels.fused_linear_policy_loss``; verl 0.9 semantics and names).

    Args (the hyper-parameters, fixed for the module's life):
        loss_mode: ``vanilla`` (PPO clip with clip-higher and dual-clip ``clip_ratio_c``), ``clip_cov``,
            ``kl_cov`` or ``gpg`` — verl's ``actor.policy_loss.loss_mode``.
        loss_agg_mode: ``token-mean`` | ``token-sum`` | ``seq-mean-token-sum`` | ``seq-mean-token-mean`` |
            ``seq-mean-token-sum-norm`` (verl 0.9 ``agg_loss``).
        clip_ratio_low / clip_ratio_high: ε of the ratio clip ``[1 − ε_low, 1 + ε_high]``.
        clip_ratio_c: dual-clip bound for negative advantages (vanilla only, must be > 1).
        temperature: the logits are divided by it (the sampling temperature of the rollouts).
        entropy_coeff: the loss is ``pg_loss − entropy_coeff · agg(entropy)``.
        clip_cov_ratio / clip_cov_lb / clip_cov_ub: Clip-Cov's fraction of tokens and covariance bounds.
        kl_cov_ratio / ppo_kl_coef: KL-Cov's fraction of tokens and the |logp − old| penalty coefficient.
        ignore_index: label id of positions that are not trained on (HF's -100); they are masked out.
        chunk_size: tokens per chunk of live logits (default: from a memory budget).
        backward_mode: ``in_forward`` (6·N·H·V) or ``recompute`` (8·N·H·V, no V·H fp32 accumulator on GPU).
        backend: ``auto`` (Triton on CUDA, chunked torch on CPU), ``triton`` or ``torch``.

    ``forward`` returns a :class:`~spear_kernels.PolicyLossOutput`: ``loss`` (scalar; ``backward()`` gives
    the gradients of hidden, weight and bias), ``logp`` / ``entropy`` ([B, L] fp32, detached),
    ``pg_clipfrac``, ``pg_clipfrac_lower``, ``ppo_kl`` (detached device scalars, no host sync) and
    ``selected`` (the Clip-Cov / KL-Cov token mask, else None).
    """

    def __init__(
        self,
        loss_mode: str = "vanilla",
        loss_agg_mode: str = "token-mean",
        clip_ratio_low: float = 0.2,
        clip_ratio_high: float = 0.2,
        clip_ratio_c: float = 3.0,
        temperature: float = 1.0,
        entropy_coeff: float = 0.0,
        clip_cov_ratio: float = 2e-4,
        clip_cov_lb: float = 1.0,
        clip_cov_ub: float = 5.0,
        kl_cov_ratio: float = 2e-4,
        ppo_kl_coef: float = 1.0,
        ignore_index: int = -100,
        chunk_size: int | None = None,
        backward_mode: str = "in_forward",
        backend: Backend = "auto",
    ) -> None:
        super().__init__()
        if loss_mode not in LOSS_MODES:
            raise ValueError(f"unknown loss_mode {loss_mode!r}; expected one of {tuple(LOSS_MODES)}")
        if loss_agg_mode not in AGG_MODES:
            raise ValueError(f"unknown loss_agg_mode {loss_agg_mode!r}; expected one of {AGG_MODES}")
        if backward_mode not in BACKWARD_MODES:
            raise ValueError(f"backward_mode must be one of {BACKWARD_MODES}, got {backward_mode!r}")
        if loss_mode == "vanilla" and not clip_ratio_c > 1.0:
            raise ValueError(f"clip_ratio_c must be > 1 for dual-clip, got {clip_ratio_c}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.loss_mode = loss_mode
        self.loss_agg_mode = loss_agg_mode
        self.clip_ratio_low = clip_ratio_low
        self.clip_ratio_high = clip_ratio_high
        self.clip_ratio_c = clip_ratio_c
        self.temperature = temperature
        self.entropy_coeff = entropy_coeff
        self.clip_cov_ratio = clip_cov_ratio
        self.clip_cov_lb = clip_cov_lb
        self.clip_cov_ub = clip_cov_ub
        self.kl_cov_ratio = kl_cov_ratio
        self.ppo_kl_coef = ppo_kl_coef
        self.ignore_index = ignore_index
        self.chunk_size = chunk_size
        self.backward_mode = backward_mode
        self.backend = backend

    def extra_repr(self) -> str:
        return (f"loss_mode={self.loss_mode!r}, loss_agg_mode={self.loss_agg_mode!r}, "
                f"clip_ratio=({self.clip_ratio_low}, {self.clip_ratio_high}), temperature={self.temperature}, "
                f"entropy_coeff={self.entropy_coeff}")  # fmt: skip

    def forward(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        advantages: torch.Tensor,
        old_logp: torch.Tensor | None = None,
        response_mask: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        *,
        weights: torch.Tensor | None = None,
        entropy_weights: torch.Tensor | None = None,
        replay_mask: torch.Tensor | None = None,
        replay_coef: float = 1.0,
        generator: torch.Generator | None = None,
        dp_size: int = 1,
        batch_num_tokens: float | torch.Tensor | None = None,
        global_batch_size: float | torch.Tensor | None = None,
        loss_scale_factor: float | None = None,
    ) -> PolicyLossOutput:
        """Loss, per-token log-probs / entropy and clip fractions of one micro-batch.

        Args:
            hidden: [B, L, H] last hidden states, already shifted: ``hidden[:, k]`` predicts ``labels[:, k]``.
            weight: [V, H] lm_head weight (cast to hidden's dtype, or the autocast dtype, if it differs);
                bias: optional [V].
            labels: [B, L] target ids; ``ignore_index`` positions are masked out.
            advantages: [B, L], or [B] (one per sequence, GRPO-style).
            old_logp: [B, L] behaviour log-probs; None means exactly on-policy (ratio 1: this pass's own
                log-probs, detached; TRL's ``num_iterations=1``).
            response_mask: [B, L] 0/1 tokens to train on (default: every non-``ignore_index`` label).
            weights: optional [B, L] or [B] multipliers of the per-token policy loss (e.g. importance weights).
            entropy_weights: optional [B, L] or [B] multipliers of the entropy bonus.
            replay_mask, replay_coef: self-imitation (SPEAR) weighting: rows (``[B]``, or tokens ``[B, L]``)
                drawn from the replay buffer have their policy loss and entropy bonus scaled by the replay
                coefficient ``c(t)``, on-policy rows by 1 — the engine's "on-policy rows + replay rows × c(t)".
            generator: Clip-Cov's random draw (a torch.Generator on the tensors' device).
            dp_size, batch_num_tokens, global_batch_size, loss_scale_factor: verl 0.9's global counts of
                the aggregation, for data-parallel ranks and gradient accumulation (see ``agg_scale``).
        """
        if labels.dim() != 2:
            raise ValueError(f"labels must be [B, L], got {tuple(labels.shape)}")
        if hidden.dim() != 3 or hidden.shape[:2] != labels.shape:
            raise ValueError(f"hidden must be [B, L, H] with [B, L] = {tuple(labels.shape)}, got {tuple(hidden.shape)}")
        keep = labels != self.ignore_index
        mask = keep.float() if response_mask is None else response_mask.float() * keep
        adv = _per_token("advantages", advantages, labels)
        w = _per_token("weights", weights, labels)
        ew = _per_token("entropy_weights", entropy_weights, labels)
        if replay_mask is not None:
            rows = _per_token("replay_mask", replay_mask, labels).bool()
            sil = torch.where(rows, float(replay_coef), 1.0).to(device=labels.device, dtype=torch.float32)
            w = sil if w is None else w.float() * sil
            ew = sil if ew is None else ew.float() * sil
        x, wt, b = head_operands(hidden, weight, bias)
        with no_autocast(x):
            return fused_linear_policy_loss(
                x, wt, labels, old_logp, adv, mask, bias=b, temperature=self.temperature,
                loss_mode=self.loss_mode, loss_agg_mode=self.loss_agg_mode, clip_ratio_low=self.clip_ratio_low,
                clip_ratio_high=self.clip_ratio_high, clip_ratio_c=self.clip_ratio_c, weights=w,
                entropy_coeff=self.entropy_coeff, entropy_weights=ew, clip_cov_ratio=self.clip_cov_ratio,
                clip_cov_lb=self.clip_cov_lb, clip_cov_ub=self.clip_cov_ub, kl_cov_ratio=self.kl_cov_ratio,
                ppo_kl_coef=self.ppo_kl_coef, generator=generator, dp_size=dp_size,
                batch_num_tokens=batch_num_tokens, global_batch_size=global_batch_size,
                loss_scale_factor=loss_scale_factor, chunk_size=self.chunk_size,
                backward_mode=self.backward_mode, backend=self.backend,
            )  # fmt: skip


class LinearLogprobEntropy(torch.nn.Module):
    """Per-token log-prob of ``labels`` and entropy of ``softmax((hidden @ weight.T + bias) / temperature)``,
    differentiable (any upstream gradients for both), without [N, V] logits
    (``spear_kernels.linear_logprob_entropy``). Labels outside [0, V) (e.g. -100) give log-prob 0 and no
    log-prob gradient; their entropy is still the distribution's. Returns fp32 tensors of ``labels``' shape.
    """

    def __init__(self, temperature: float = 1.0, chunk_size: int | None = None, backend: Backend = "auto") -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.chunk_size = chunk_size
        self.backend = backend

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, chunk_size={self.chunk_size}, backend={self.backend!r}"

    def forward(
        self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x, w, b = head_operands(hidden, weight, bias)
        with no_autocast(x):
            return linear_logprob_entropy(
                x, w, labels, bias=b, temperature=self.temperature, chunk_size=self.chunk_size, backend=self.backend
            )
