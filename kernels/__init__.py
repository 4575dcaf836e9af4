"""spear_kernels: fused log-prob / entropy, Clip-Cov / KL-Cov masks and the SIL-weighted PPO-family loss.

Depends on torch (+ triton for the GPU kernels) only. CUDA tensors run Triton kernels; CPU tensors run
a chunked torch path with bounded memory; ``backend="triton"`` / ``SPEAR_KERNELS_BACKEND=triton``
forces Triton (on CPU only under ``TRITON_INTERPRET=1``). Oracles live in ``spear_kernels.reference``.
"""

from .cov_clip import clip_cov_mask, kl_cov_mask, token_cov
from .linear_logprob_entropy import (
    linear_logprob_entropy,
    linear_logprob_entropy_stats,
    linear_logprob_entropy_with_grad,
)
from .logprob_entropy import logprob_entropy
from .policy_loss import (
    AGG_MODES,
    LOSS_MODES,
    PolicyLossOutput,
    agg_scale,
    fused_linear_policy_loss,
    policy_loss,
)

__all__ = [
    "AGG_MODES",
    "LOSS_MODES",
    "PolicyLossOutput",
    "agg_scale",
    "clip_cov_mask",
    "fused_linear_policy_loss",
    "kl_cov_mask",
    "linear_logprob_entropy",
    "linear_logprob_entropy_stats",
    "linear_logprob_entropy_with_grad",
    "logprob_entropy",
    "policy_loss",
    "token_cov",
]
