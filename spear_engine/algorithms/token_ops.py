"""Token-level tensor primitives: masked reductions, log-probs and entropy from logits.

Names, arguments and results follow ``verl.utils.torch_functional`` (verl 0.9.1) so that code written
against verl reads the same here. ``logprobs_from_logits`` and ``entropy_from_logits`` dispatch CUDA
tensors to the Triton kernels of ``spear_kernels`` (:mod:`~spear_engine.algorithms.kernel_dispatch`);
this module holds the CPU path: fp32 (or wider) math over chunks of rows, with a hand-written backward that
recomputes the softmax per chunk, so neither pass keeps a full-size fp32 copy of the logits alive.
"""

from __future__ import annotations

import torch

from spear_engine.algorithms.kernel_dispatch import kernel_logprob_entropy, use_kernels

DEFAULT_CHUNK_ELEMENTS = 1 << 24
"""Logit elements per chunk when ``chunk_size`` is not given (64 MiB of fp32): bounds the
temporary memory of both passes independently of the batch size."""


# --------------------------------------------------------------------------------------------
# masked reductions
# --------------------------------------------------------------------------------------------
def masked_sum(
    values: torch.Tensor, mask: torch.Tensor, axis: int | tuple[int, ...] | None = None
) -> torch.Tensor:
    """Sum of ``values`` where ``mask`` is non-zero (bool or numeric mask, weights multiply).

    Values outside the mask are replaced by 0 before multiplying, so NaN/inf padding cannot leak in.
    """
    kept = torch.where(mask.bool(), values, 0.0)
    return (kept * mask).sum(dim=axis)


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
# log-probs and entropy (chunked fp32 math, custom backward)
# --------------------------------------------------------------------------------------------
def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least fp32: half-precision logits are upcast per chunk, fp64 stays fp64."""
    return torch.promote_types(dtype, torch.float32)


def _rows_per_chunk(vocab: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        return chunk_size
    return max(1, DEFAULT_CHUNK_ELEMENTS // max(vocab, 1))


class _LogProbsFn(torch.autograd.Function):
    """log p(label) = z[label] - logsumexp(z) per row; backward: g * (onehot - softmax)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, rows: int, out_dtype: torch.dtype):
        cdt = _compute_dtype(logits.dtype)
        out = torch.empty(logits.shape[0], dtype=cdt, device=logits.device)
        for start in range(0, logits.shape[0], rows):
            z = logits[start : start + rows].to(cdt)
            lab = labels[start : start + rows].unsqueeze(-1)
            out[start : start + rows] = z.gather(-1, lab).squeeze(-1) - torch.logsumexp(z, dim=-1)
        ctx.save_for_backward(logits, labels)
        ctx.rows = rows
        return out.to(out_dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        logits, labels = ctx.saved_tensors
        cdt = _compute_dtype(logits.dtype)
        grad = torch.empty_like(logits)
        for start in range(0, logits.shape[0], ctx.rows):
            stop = start + ctx.rows
            g = grad_out[start:stop].to(cdt).unsqueeze(-1)
            d = torch.softmax(logits[start:stop].to(cdt), dim=-1).neg_()
            d.scatter_add_(-1, labels[start:stop].unsqueeze(-1), torch.ones_like(g))
            grad[start:stop] = (d * g).to(logits.dtype)
        return grad, None, None, None


class _EntropyFn(torch.autograd.Function):
    """H = logsumexp(z) - sum softmax(z) * z per row; backward: dH/dz = -p * (z - E_p[z])."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, rows: int, out_dtype: torch.dtype):
        cdt = _compute_dtype(logits.dtype)
        out = torch.empty(logits.shape[0], dtype=cdt, device=logits.device)
        for start in range(0, logits.shape[0], rows):
            z = logits[start : start + rows].to(cdt)
            p = torch.softmax(z, dim=-1)
            out[start : start + rows] = torch.logsumexp(z, dim=-1) - (p * z).sum(dim=-1)
        ctx.save_for_backward(logits)
        ctx.rows = rows
        return out.to(out_dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (logits,) = ctx.saved_tensors
        cdt = _compute_dtype(logits.dtype)
        grad = torch.empty_like(logits)
        for start in range(0, logits.shape[0], ctx.rows):
            stop = start + ctx.rows
            z = logits[start:stop].to(cdt)
            p = torch.softmax(z, dim=-1)
            mean_z = (p * z).sum(dim=-1, keepdim=True)
            g = grad_out[start:stop].to(cdt).unsqueeze(-1)
            grad[start:stop] = (p * (mean_z - z) * g).to(logits.dtype)
        return grad, None, None


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
        logits: ``[..., V]`` unnormalised scores (any float dtype; math runs in >= fp32).
        labels: integer ids, shape ``logits.shape[:-1]``.
        inplace_backward: accepted for verl signature compatibility (flash-attn path); unused.
        chunk_size: rows per chunk (default: ``DEFAULT_CHUNK_ELEMENTS // V``).
        out_dtype: result dtype; default ``logits.dtype`` as verl. Pass ``torch.float32`` to keep
            the fp32 precision of bf16 logits (verl computes bf16 log-softmax in bf16).
    """
    del inplace_backward
    if use_kernels(logits):
        logp, _ = kernel_logprob_entropy(logits, labels)
        return logp.to(out_dtype or logits.dtype)
    lead = logits.shape[:-1]
    vocab = logits.shape[-1]
    flat = logits.reshape(-1, vocab)
    flat_labels = labels.reshape(-1).to(torch.long)
    if flat_labels.shape[0] != flat.shape[0]:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} does not match logits shape {tuple(logits.shape)}"
        )
    rows = _rows_per_chunk(vocab, chunk_size)
    out = _LogProbsFn.apply(flat, flat_labels, rows, out_dtype or logits.dtype)
    return out.reshape(lead)


def entropy_from_logits(
    logits: torch.Tensor, *, chunk_size: int | None = None, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Entropy of ``softmax(logits)`` over the last axis: shape ``logits.shape[:-1]``.

    Differentiable (the entropy bonus trains through it). ``chunk_size``/``out_dtype`` as in
    :func:`logprobs_from_logits`.
    """
    if use_kernels(logits):
        _, entropy = kernel_logprob_entropy(logits, torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device))
        return entropy.to(out_dtype or logits.dtype)
    lead = logits.shape[:-1]
    vocab = logits.shape[-1]
    flat = logits.reshape(-1, vocab)
    rows = _rows_per_chunk(vocab, chunk_size)
    out = _EntropyFn.apply(flat, rows, out_dtype or logits.dtype)
    return out.reshape(lead)
