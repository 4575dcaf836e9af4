"""Token-level tensor primitives: masked reductions, log-probs and entropy from logits.

Names, arguments and results follow ``verl.utils.torch_functional`` (verl 0.9.1) so that code written
against verl reads the same here. The math is ``spear_kernels``' (which cannot import this package), so
each exists once: :func:`masked_sum` is ``spear_kernels.utils.masked_sum`` (the one ``agg_loss`` uses),
and :func:`logprobs_from_logits` / :func:`entropy_from_logits` are the kernels' log-prob / entropy,
dispatched like the policy losses (:func:`~spear_engine.algorithms.kernel_dispatch.use_kernels`, one
switch ``SPEAR_KERNELS_BACKEND``): a tensor the kernels run through Triton (CUDA) takes the fused
``spear_kernels.logprob_entropy``; any other tensor (CPU), and float64 logits (the kernels' math is
fp32), takes the kernels' torch reference ``spear_kernels.reference.logprob_entropy_ref``, which is
verl's own formula (``log_softmax`` gathered, ``logsumexp(z) - sum softmax(z) z``) at fp32 or wider,
with autograd's gradient.
"""

from __future__ import annotations

import torch

import spear_kernels
from spear_engine.algorithms.kernel_dispatch import use_kernels
from spear_kernels.reference import logprob_entropy_ref
from spear_kernels.utils import masked_sum

__all__ = ["entropy_from_logits", "logprobs_from_logits", "masked_mean", "masked_sum", "masked_var"]


# --------------------------------------------------------------------------------------------
# masked reductions
# --------------------------------------------------------------------------------------------
def masked_mean(
    values: torch.Tensor, mask: torch.Tensor, axis: int | tuple[int, ...] | None = None
) -> torch.Tensor:
    """Mean of ``values`` over the mask; an empty mask gives 0 (the denominator carries +1e-8, as verl)."""
    return masked_sum(values, mask, axis) / (mask.sum(dim=axis) + 1e-8)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``values`` over the whole mask (Bessel-corrected when ``unbiased``).

    Raises ValueError when the mask selects no element, or (unbiased) exactly one.
    """
    centred = values - masked_mean(values, mask)
    var = masked_mean(centred * centred, mask)
    if not unbiased:
        return var
    count = mask.sum()
    if count == 0:
        raise ValueError("masked_var: the mask selects no element")
    if count == 1:
        raise ValueError("masked_var: the mask selects one element; the unbiased variance is undefined")
    return var * (count / (count - 1))


# --------------------------------------------------------------------------------------------
# log-probs and entropy: spear_kernels.logprob_entropy (Triton) or its torch reference
# --------------------------------------------------------------------------------------------
def _check_chunk_size(chunk_size: int | None) -> None:
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def _logprob_entropy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(label), entropy) of ``softmax(logits)``, both shaped ``logits.shape[:-1]``, differentiable."""
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} does not match logits shape {tuple(logits.shape)}"
        )
    labels = labels.long()
    if logits.dtype != torch.float64 and use_kernels(logits):
        return spear_kernels.logprob_entropy(logits, labels)
    return logprob_entropy_ref(logits, labels, compute_dtype=torch.promote_types(logits.dtype, torch.float32))


def logprobs_from_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    inplace_backward: bool = True,
    *,
    chunk_size: int | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Log-probability of ``labels`` under ``softmax(logits)``: shape ``logits.shape[:-1]``.

    Args:
        logits: ``[..., V]`` unnormalised scores (fp16 / bf16 / fp32: fp32 math; fp64: fp64 math).
        labels: integer ids, shape ``logits.shape[:-1]``.
        inplace_backward: accepted for verl signature compatibility (flash-attn path); unused.
        chunk_size: accepted for compatibility (must be >= 1); unused (the Triton kernel streams the
            vocabulary; the torch reference materialises ``[..., V]`` fp32, as verl does).
        out_dtype: result dtype; default ``logits.dtype`` as verl. Pass ``torch.float32`` to keep
            the fp32 precision of bf16 logits (verl computes bf16 log-softmax in bf16).
    """
    del inplace_backward
    _check_chunk_size(chunk_size)
    logp, _ = _logprob_entropy(logits, labels)
    return logp.to(out_dtype or logits.dtype)


def entropy_from_logits(
    logits: torch.Tensor, *, chunk_size: int | None = None, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Entropy of ``softmax(logits)`` over the last axis: shape ``logits.shape[:-1]``.

    Differentiable (the entropy bonus trains through it). ``chunk_size``/``out_dtype`` as in
    :func:`logprobs_from_logits`.
    """
    _check_chunk_size(chunk_size)
    labels = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    _, entropy = _logprob_entropy(logits, labels)
    return entropy.to(out_dtype or logits.dtype)
