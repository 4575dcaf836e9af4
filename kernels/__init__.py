"""spear_kernels: fused log-prob / entropy, Clip-Cov / KL-Cov masks and the SIL-weighted PPO-family loss.

Depends on torch (+ triton for the GPU kernels) only. CUDA tensors run Triton kernels; CPU tensors run
a chunked torch path with bounded memory; ``backend="triton"`` / ``SPEAR_KERNELS_BACKEND=triton``
forces Triton (on CPU only under ``TRITON_INTERPRET=1``), ``=torch`` the torch path. Oracles live in
``spear_kernels.reference``. Loss aggregation (verl 0.9 ``agg_loss`` and its per-token form
``agg_scale``, with global counts) is defined once, in ``spear_kernels.utils``. Drop-in front ends for
other trainers: ``FusedLinearPolicyLoss`` / ``LinearLogprobEntropy`` (``nn.Module`` classes) and
``token_logprobs_entropy`` (any Hugging Face causal LM, no full logits); see kernels/README.md.
"""

from .cov_clip import clip_cov_mask, kl_cov_mask, token_cov
from .hf import causal_lm_parts, token_logprobs_entropy
from .linear_logprob_entropy import (
    linear_logprob_entropy,
    linear_logprob_entropy_stats,
    linear_logprob_entropy_with_grad,
)
from .logprob_entropy import logprob_entropy
from .modules import FusedLinearPolicyLoss, LinearLogprobEntropy
from .policy_loss import LOSS_MODES, PolicyLossOutput, fused_linear_policy_loss, policy_loss
from .utils import AGG_MODES, BACKEND_ENV, agg_loss, agg_scale, legacy_global_batch_info

__all__ = [
    "AGG_MODES",
    "BACKEND_ENV",
    "LOSS_MODES",
    "FusedLinearPolicyLoss",
    "LinearLogprobEntropy",
    "PolicyLossOutput",
    "agg_loss",
    "agg_scale",
    "causal_lm_parts",
    "clip_cov_mask",
    "fused_linear_policy_loss",
    "kl_cov_mask",
    "legacy_global_batch_info",
    "linear_logprob_entropy",
    "linear_logprob_entropy_stats",
    "linear_logprob_entropy_with_grad",
    "logprob_entropy",
    "policy_loss",
    "token_cov",
    "token_logprobs_entropy",
]
