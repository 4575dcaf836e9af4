"""Per-token log-prob of the target and entropy from logits [N, V], forward and backward.

Why: verl's ``logprobs_from_logits`` + ``entropy_from_logits`` upcast the whole [N, V] logits to fp32
and keep softmax temporaries of the same size. Here the vocabulary is streamed in blocks with an online
(max, Σexp, Σexp·(z−max)) so no [N, V] fp32 copy ever exists; the backward recomputes p from the saved
log-sum-exp and takes arbitrary upstream gradients for both outputs:

    dz_j = g_lp·(1[j=y] − p_j) − g_H·p_j·(log p_j + H),   dlogits = dz / T.

Entropy is accumulated relative to the running max, so logits of ±1e4 cost no precision.
"""

from __future__ import annotations

import torch

from .utils import (
    HAS_TRITON,
    Backend,
    check_float,
    check_written,
    row_block,
    scratch,
    scratch_like,
    use_triton,
)

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .online_softmax import online_softmax_fold

    @triton.jit
    def _lpe_fwd_kernel(
        z_ptr, stride_z, labels_ptr, logp_ptr, ent_ptr, lse_ptr, V, inv_t, BLOCK: tl.constexpr
    ):
        """One program per row: online max / Σexp / Σexp·(z−max) over vocabulary blocks."""
        row = tl.program_id(0).to(tl.int64)
        base = z_ptr + row * stride_z
        label = tl.load(labels_ptr + row).to(tl.int64)
        m = tl.full((), -1.0e30, tl.float32)
        s = tl.zeros((), tl.float32)
        t = tl.zeros((), tl.float32)
        zy = tl.zeros((), tl.float32)
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            valid = cols < V
            z = tl.load(base + cols, mask=valid, other=float("-inf")).to(tl.float32) * inv_t
            m, s, t, zy = online_softmax_fold(z, valid, cols == label, m, s, t, zy, 0)
        log_s = tl.log(s)
        lse = m + log_s
        label_ok = (label >= 0) & (label < V)
        tl.store(logp_ptr + row, tl.where(label_ok, zy - lse, 0.0))
        tl.store(ent_ptr + row, log_s - t / s)
        tl.store(lse_ptr + row, lse)

    @triton.jit
    def _lpe_bwd_kernel(
        z_ptr, stride_z, dz_ptr, stride_dz, labels_ptr, lse_ptr, ent_ptr, glp_ptr, gent_ptr, V, z_scale,
        out_scale, BLOCK: tl.constexpr,
    ):
        """Grid (rows, vocab blocks): recompute p from the saved lse, write dlogits in dz's dtype.

        Each program reads and writes only its own [row, block] tile, so dz may alias z (in place)."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        valid = cols < V
        label = tl.load(labels_ptr + row).to(tl.int64)
        lse = tl.load(lse_ptr + row)
        ent = tl.load(ent_ptr + row)
        g_lp = tl.load(glp_ptr + row)
        g_h = tl.load(gent_ptr + row)
        g_lp = tl.where((label >= 0) & (label < V), g_lp, 0.0)
        z = tl.load(z_ptr + row * stride_z + cols, mask=valid, other=0.0).to(tl.float32) * z_scale
        logp = tl.where(valid, z - lse, 0.0)
        p = tl.where(valid, tl.exp(logp), 0.0)
        dz = p * (-g_h * (logp + ent) - g_lp) + tl.where(cols == label, g_lp, 0.0)
        tl.store(dz_ptr + row * stride_dz + cols, (dz * out_scale).to(dz_ptr.dtype.element_ty), mask=valid)


def triton_row_stats(
    z: torch.Tensor, labels: torch.Tensor, inv_t: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp, entropy, lse), fp32 [R], of rows of z (any float dtype, unit column stride)."""
    rows, v = z.shape
    logp = scratch(rows, device=z.device, dtype=torch.float32)
    ent = scratch_like(logp)
    lse = scratch_like(logp)
    if rows:
        _lpe_fwd_kernel[(rows,)](z, z.stride(0), labels, logp, ent, lse, v, inv_t, BLOCK=row_block(v), num_warps=8)
        check_written("logprob_entropy stats kernel", logp=logp, entropy=ent, lse=lse)
    return logp, ent, lse


def triton_row_grad(
    z: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    ent: torch.Tensor,
    g_lp: torch.Tensor,
    g_h: torch.Tensor,
    inv_t: float,
    out: torch.Tensor,
    z_scale: float | None = None,
) -> torch.Tensor:
    """dlogits of rows of z into ``out`` (any float dtype, may alias z). ``z_scale`` (default 1/T) is
    what z is multiplied by on load: 1 when z already holds logits / T."""
    rows, v = z.shape
    if rows:
        block = row_block(v)
        grid = (rows, triton.cdiv(v, block))
        _lpe_bwd_kernel[grid](
            z, z.stride(0), out, out.stride(0), labels, lse, ent, g_lp, g_h, v,
            inv_t if z_scale is None else z_scale, inv_t, BLOCK=block, num_warps=8,
        )
        check_written("logprob_entropy row-grad kernel", dlogits=out)
    return out


# ----------------------------------------------------------------------------------------------
# torch path (CPU): the same math over row chunks whose fp32 copy stays within a few tens of MB.


def torch_row_stats_(z: torch.Tensor, labels: torch.Tensor, zy: torch.Tensor | None = None):
    """In place on an fp32 row block z (already scaled by 1/T): z ← z − max. Returns the per-row
    (logp, entropy, lse, e = exp(z − max), s = Σe, t = Σe·(z − max)) needed for the gradient.

    ``zy`` (optional, fp32) is the exact scaled target logit when z itself was rounded (bf16 GEMM)."""
    v = z.shape[1]
    m = z.amax(1, keepdim=True)
    z.sub_(m)
    e = torch.exp(z)
    s = e.sum(1)
    t = torch.linalg.vecdot(e, z)
    log_s = torch.log(s)
    ok = (labels >= 0) & (labels < v)
    safe = torch.where(ok, labels, torch.zeros_like(labels)).long().unsqueeze(1)
    m = m.squeeze(1)
    zy_rel = z.gather(1, safe).squeeze(1) if zy is None else zy - m
    logp = torch.where(ok, zy_rel - log_s, torch.zeros_like(s))
    ent = log_s - t / s
    return logp, ent, m + log_s, e, s, t


def torch_row_grad_(
    zs: torch.Tensor,
    e: torch.Tensor,
    s: torch.Tensor,
    t: torch.Tensor,
    labels: torch.Tensor,
    g_lp: torch.Tensor,
    g_h: torch.Tensor,
    inv_t: float,
) -> torch.Tensor:
    """In place: zs (= z − c per row) becomes dlogits, with e = exp(zs), s = Σe, t = Σe·zs.

    dz = (e/s)·(−g_H·zs + g_H·t/s − g_lp) + g_lp·1[j=y], all divided by T. Works for c = max (forward
    statistics) and for c = lse (recompute: e = p, s = 1, t = −H)."""
    v = zs.shape[1]
    ok = (labels >= 0) & (labels < v)
    g_lp = torch.where(ok, g_lp, torch.zeros_like(g_lp))
    inv_s = 1.0 / s
    alpha = (-g_h * inv_s * inv_t).unsqueeze(1)
    beta = ((g_h * t * inv_s - g_lp) * inv_s * inv_t).unsqueeze(1)
    torch.addcmul(beta, zs, alpha, out=zs)
    zs.mul_(e)
    safe = torch.where(ok, labels, torch.zeros_like(labels)).long().unsqueeze(1)
    zs.scatter_add_(1, safe, (g_lp * inv_t).unsqueeze(1))
    return zs


def _rows_per_chunk(v: int, budget_bytes: int = 32 << 20) -> int:
    return max(1, budget_bytes // (4 * max(v, 1)))


def _torch_forward(logits: torch.Tensor, labels: torch.Tensor, inv_t: float):
    n, v = logits.shape
    logp = scratch(n, dtype=torch.float32, device=logits.device)
    ent = scratch_like(logp)
    lse = scratch_like(logp)
    step = _rows_per_chunk(v)
    for a in range(0, n, step):
        z = logits[a : a + step].to(torch.float32, copy=True)  # a copy: the caller's logits stay intact
        if inv_t != 1.0:
            z.mul_(inv_t)
        logp[a : a + step], ent[a : a + step], lse[a : a + step], *_ = torch_row_stats_(z, labels[a : a + step])
    check_written("logprob_entropy torch forward", logp=logp, entropy=ent, lse=lse)
    return logp, ent, lse


def _torch_backward(logits, labels, lse, ent, g_lp, g_h, inv_t):
    n, v = logits.shape
    grad = scratch_like(logits)
    step = _rows_per_chunk(v)
    for a in range(0, n, step):
        b = min(n, a + step)
        z = logits[a:b].float().mul(inv_t)
        z.sub_(lse[a:b].unsqueeze(1))
        p = torch.exp(z)
        torch_row_grad_(z, p, torch.ones_like(lse[a:b]), -ent[a:b], labels[a:b], g_lp[a:b], g_h[a:b], inv_t)
        grad[a:b] = z
    check_written("logprob_entropy torch backward", dlogits=grad)
    return grad


class LogprobEntropyFunction(torch.autograd.Function):
    """autograd wrapper: saves logits, labels, lse and entropy; recomputes p in the backward."""

    @staticmethod
    def forward(ctx, logits, labels, temperature, triton_path):
        inv_t = 1.0 / temperature
        if triton_path:
            logp, ent, lse = triton_row_stats(logits, labels, inv_t)
        else:
            logp, ent, lse = _torch_forward(logits, labels, inv_t)
        ctx.save_for_backward(logits, labels, lse, ent)
        ctx.inv_t, ctx.triton_path = inv_t, triton_path
        return logp, ent

    @staticmethod
    def backward(ctx, g_lp, g_h):
        logits, labels, lse, ent = ctx.saved_tensors
        n = logits.shape[0]
        g_lp = torch.zeros(n, device=logits.device) if g_lp is None else g_lp.float().contiguous()
        g_h = torch.zeros(n, device=logits.device) if g_h is None else g_h.float().contiguous()
        if ctx.triton_path:
            grad = triton_row_grad(logits, labels, lse, ent, g_lp, g_h, ctx.inv_t, scratch_like(logits))
        else:
            grad = _torch_backward(logits, labels, lse, ent, g_lp, g_h, ctx.inv_t)
        return grad, None, None, None


def logprob_entropy(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0, backend: Backend = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-prob of ``labels`` and entropy of softmax(logits / temperature).

    Args:
        logits: [..., V] float32 / bfloat16 / float16 (math is fp32 whatever the input dtype).
        labels: [...] integer target ids; ids outside [0, V) (e.g. -100) give logp 0 and no gradient.
        temperature: divides the logits (verl applies it before log-softmax).
        backend: "auto" (Triton for CUDA tensors, chunked torch for CPU), "triton" or "torch".

    Returns:
        (logp, entropy), both float32 of shape labels.shape, differentiable w.r.t. logits with arbitrary
        upstream gradients for both.
    """
    check_float("logits", logits)
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"labels shape {tuple(labels.shape)} != logits.shape[:-1] {tuple(logits.shape[:-1])}")
    if temperature <= 0:
        raise ValueError("temperature must be > 0")
    shape = labels.shape
    z = logits.reshape(-1, logits.shape[-1])
    if z.stride(-1) != 1:
        z = z.contiguous()
    lab = labels.reshape(-1).contiguous()
    logp, ent = LogprobEntropyFunction.apply(z, lab, float(temperature), use_triton(z, backend))
    return logp.view(shape), ent.view(shape)
