"""Fused lm_head + log-prob + entropy: from hidden X [N, H] and weight W [V, H], no [N, V] logits.

Why: at N = 16k tokens and V = 150k the logits alone are 5 GB in bf16, plus 10 GB of fp32 temporaries
in an unfused pipeline. Here logits exist one token chunk (CPU) or one register tile (Triton) at a time.

Two contracts (one GEMM over the vocabulary costs 2·N·H·V FLOPs):

* ``linear_logprob_entropy`` — generic op, any upstream gradients for logp and entropy. The forward
  keeps only (lse, entropy) per token; the backward recomputes the logits (8·N·H·V in all).
* ``linear_logprob_entropy_with_grad`` — the loss-fused variant: a ``grad_fn`` turns each chunk's
  (logp, entropy) into (dL/dlogp, dL/dH) while the chunk's logits are still live, so the backward runs
  inside the forward and costs nothing more than its two GEMMs (6·N·H·V). Used by
  ``fused_linear_policy_loss``.

Traps avoided: W is streamed once per large token chunk (never per small one); dW is accumulated in
fp32 across chunks (one final cast), and on the Triton recompute path it is written exactly once per
vocabulary slice (vocab-outer loop, the GEMM reduces over all tokens); no fp32 atomics.

The CPU (torch) path is ``linear_cpu``: one GEMM per token chunk, an fp32 epilogue that turns the
logits into dZ in place (eager, or compiled by inductor under ``backend="torch_compile"``), two GEMMs
for dX and dW. This module holds the op's entry points, its chunk sizing and the Triton path.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .linear_cpu import GradFn, torch_pass
from .logprob_entropy import triton_row_grad
from .utils import (
    HAS_TRITON,
    Backend,
    backend_choice,
    check_float,
    check_written,
    interpreting,
    mm_acc_,
    scratch,
    scratch_like,
    use_triton,
)

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .online_softmax import online_softmax_fold

    @triton.jit
    def _linear_fwd_kernel(
        x_ptr, w_ptr, b_ptr, labels_ptr, pm_ptr, ps_ptr, pt_ptr, pzy_ptr, z_ptr,
        N, V, H, stride_xm, stride_wn, stride_z, n_splits, split_v, inv_t,
        HAS_BIAS: tl.constexpr, STORE_Z: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """Grid (token tiles, vocab splits). Each program owns BLOCK_M tokens x one vocab split: tile GEMM
        over H in fp32, then folds the tile into online (max, Σexp, Σexp·(z−max), target logit). Writes
        one partial per (token, split); a tiny torch merge combines the splits. Optionally stores the fp32
        logits tile (the loss-fused 6NHV path)."""
        pid_m = tl.program_id(0)
        pid_s = tl.program_id(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < N
        rows64 = rows.to(tl.int64)
        labels = tl.load(labels_ptr + rows, mask=rmask, other=-1).to(tl.int64)
        m = tl.full((BLOCK_M,), -1.0e30, tl.float32)
        s = tl.zeros((BLOCK_M,), tl.float32)
        t = tl.zeros((BLOCK_M,), tl.float32)
        zy = tl.zeros((BLOCK_M,), tl.float32)
        v_lo = pid_s * split_v
        v_hi = tl.minimum(v_lo + split_v, V)
        ks0 = tl.arange(0, BLOCK_K)
        for n0 in range(v_lo, v_hi, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            cmask = cols < v_hi
            acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
            for k0 in range(0, H, BLOCK_K):
                ks = k0 + ks0
                kmask = ks < H
                xa = tl.load(x_ptr + rows64[:, None] * stride_xm + ks[None, :],
                             mask=rmask[:, None] & kmask[None, :], other=0.0)
                wb = tl.load(w_ptr + cols.to(tl.int64)[:, None] * stride_wn + ks[None, :],
                             mask=cmask[:, None] & kmask[None, :], other=0.0)
                if IEEE:  # fp32 inputs (no TF32), and the interpreter, whose half-precision dot is wrong
                    acc = tl.dot(xa.to(tl.float32), tl.trans(wb.to(tl.float32)), acc, input_precision="ieee")
                else:
                    acc = tl.dot(xa, tl.trans(wb), acc)
            if HAS_BIAS:
                acc += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
            z = acc * inv_t
            if STORE_Z:
                tl.store(z_ptr + rows64[:, None] * stride_z + cols[None, :], z,
                         mask=rmask[:, None] & cmask[None, :])
            z = tl.where(cmask[None, :], z, float("-inf"))
            hit = cols[None, :] == labels[:, None]
            m, s, t, zy = online_softmax_fold(z, cmask[None, :], hit, m, s, t, zy, 1)
        out = rows64 * n_splits + pid_s
        tl.store(pm_ptr + out, m, mask=rmask)
        tl.store(ps_ptr + out, s, mask=rmask)
        tl.store(pt_ptr + out, t, mask=rmask)
        tl.store(pzy_ptr + out, zy, mask=rmask)

    @triton.jit
    def _linear_dz_kernel(
        x_ptr, w_ptr, b_ptr, labels_ptr, lse_ptr, ent_ptr, glp_ptr, gh_ptr, dz_ptr,
        N, V, H, v0, vc, stride_xm, stride_wn, stride_dz, inv_t,
        HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """Grid (token tiles, column tiles of the vocab slice [v0, v0 + vc)): recompute the logits tile and
        write dZ = dL/dlogits (already divided by T) in dz's dtype into a [N, vc] workspace."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < N
        rows64 = rows.to(tl.int64)
        lcols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = v0 + lcols
        cmask = (lcols < vc) & (cols < V)
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k0 in range(0, H, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            kmask = ks < H
            xa = tl.load(x_ptr + rows64[:, None] * stride_xm + ks[None, :],
                         mask=rmask[:, None] & kmask[None, :], other=0.0)
            wb = tl.load(w_ptr + cols.to(tl.int64)[:, None] * stride_wn + ks[None, :],
                         mask=cmask[:, None] & kmask[None, :], other=0.0)
            if IEEE:
                acc = tl.dot(xa.to(tl.float32), tl.trans(wb.to(tl.float32)), acc, input_precision="ieee")
            else:
                acc = tl.dot(xa, tl.trans(wb), acc)
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        labels = tl.load(labels_ptr + rows, mask=rmask, other=-1).to(tl.int64)
        lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
        ent = tl.load(ent_ptr + rows, mask=rmask, other=0.0)
        g_lp = tl.load(glp_ptr + rows, mask=rmask, other=0.0)
        g_h = tl.load(gh_ptr + rows, mask=rmask, other=0.0)
        g_lp = tl.where((labels >= 0) & (labels < V), g_lp, 0.0)
        logp = acc * inv_t - lse[:, None]
        p = tl.exp(logp)
        dz = p * (-g_h[:, None] * (logp + ent[:, None]) - g_lp[:, None])
        dz += tl.where(cols[None, :] == labels[:, None], g_lp[:, None], 0.0)
        tl.store(dz_ptr + rows64[:, None] * stride_dz + lcols[None, :], (dz * inv_t).to(dz_ptr.dtype.element_ty),
                 mask=rmask[:, None] & cmask[None, :])


def _tiles(dtype: torch.dtype) -> tuple[int, int, int]:
    if interpreting():  # few, large programs: each interpreted step costs the same whatever its size
        return 64, 256, 64
    return (64, 128, 64) if dtype == torch.float32 else (128, 128, 64)


def _merge_partials(pm, ps, pt, pzy, labels, v):
    """Combine per-split online-softmax partials into (logp, entropy, lse)."""
    mx = pm.amax(1, keepdim=True)
    a = torch.exp(pm - mx)
    s = (ps * a).sum(1)
    t = (a * (pt + (pm - mx) * ps)).sum(1)
    log_s = torch.log(s)
    lse = mx.squeeze(1) + log_s
    ok = (labels >= 0) & (labels < v)
    logp = torch.where(ok, pzy.sum(1) - lse, torch.zeros_like(lse))
    return logp, log_s - t / s, lse


def _triton_stats(x, w, b, labels, inv_t, z_out=None):
    """(logp, entropy, lse) of rows of x; with ``z_out`` [n, V] fp32 also stores logits / T there."""
    n, h = x.shape
    v = w.shape[0]
    bm, bn, bk = _tiles(x.dtype)
    split_v = bn * max(1, (2048 if not interpreting() else 4096) // bn)
    n_splits = triton.cdiv(v, split_v)
    part = scratch(4, n, n_splits, device=x.device, dtype=torch.float32)
    if n:
        grid = (triton.cdiv(n, bm), n_splits)
        _linear_fwd_kernel[grid](
            x, w, b if b is not None else x, labels, part[0], part[1], part[2], part[3],
            z_out if z_out is not None else part, n, v, h, x.stride(0), w.stride(0),
            z_out.stride(0) if z_out is not None else 0, n_splits, split_v, inv_t,
            HAS_BIAS=b is not None, STORE_Z=z_out is not None, IEEE=x.dtype == torch.float32 or interpreting(),
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=8, num_stages=3,
        )
        check_written("linear_logprob_entropy stats kernel", partials=part, logits=z_out)
    return _merge_partials(part[0], part[1], part[2], part[3], labels, v)


CHUNK_SLACK = 1.1
"""A chunk may exceed its byte budget by this factor when that saves a chunk: 4,096 rows at a budget of
1,365 become 3 chunks of 1,366, not 1,365 + 1,365 + 1,365 + 1 (each chunk costs a full V x H pass for dW)."""


def balanced_chunk_rows(n: int, v: int, itemsize: int, budget: int) -> int:
    """Rows per chunk for n rows of v logits of ``itemsize`` bytes: the fewest chunks whose logits fit
    ``budget`` (with ``CHUNK_SLACK``), all of about the same size, so that no tiny tail chunk pays a
    full pass over the weight for a handful of rows."""
    if n <= 0:
        return 1
    cap = max(1, budget // max(1, v * itemsize))
    chunks = max(1, -(-n // max(1, int(cap * CHUNK_SLACK))))
    return -(-n // chunks)


CPU_CHUNK_BYTES = {4: 128 << 20, 2: 192 << 20}
"""Logits budget of one CPU chunk, by itemsize. Half dtypes get more: their GEMMs run ~3x faster than fp32
ones on an AVX512-BF16 CPU, so a chunk's fixed costs weigh more, and 2,048-row bf16 chunks ran ~3 % faster
than 1,366-row ones at V = 49,152 (bench/RESULTS.md) while fp32 was flat from 683 to 2,048 rows."""


def cpu_chunk_rows(n: int, v: int, dtype: torch.dtype) -> int:
    """Rows per chunk of the CPU path's logits buffer (``CPU_CHUNK_BYTES``) for n tokens over a vocabulary of v."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return balanced_chunk_rows(n, v, itemsize, CPU_CHUNK_BYTES.get(itemsize, 128 << 20))


# ----------------------------------------------------------------------------------------------
# Triton path


RECOMPUTE_WORKSPACE_BYTES = 256 << 20
"""dZ workspace of the Triton recompute backward (one vocabulary slice of all tokens at a time)."""


def _triton_recompute_backward(x, w, b, labels, lse, ent, g_lp, g_h, inv_t):
    """8NHV backward, vocab-outer: per vocab slice, dZ [N, vc] for all tokens → dW slice written once,
    dX accumulated in fp32 over slices (N·H·4 bytes, far smaller than V·H).

    Each slice's dZ is a *contiguous* [N, width] view of the workspace. A strided view of a wider buffer
    (row stride vc > width) leaves never-written columns between the rows, and a CPU bf16 GEMM that
    blocks the reduction dimension may read past ``width`` into them: uninitialised memory (NaN now and
    then) times its zero-padded operand gave NaN rows in dX (the bf16 failures of issue 9)."""
    n, h = x.shape
    v = w.shape[0]
    bm, bn, bk = _tiles(x.dtype)
    vc = max(bn, (RECOMPUTE_WORKSPACE_BYTES // max(1, n * w.element_size())) // bn * bn)
    vc = min(vc, v)
    ws = scratch(n * vc, dtype=w.dtype, device=x.device)
    dx32 = torch.zeros(n, h, dtype=torch.float32, device=x.device)
    dw = scratch_like(w)
    db = scratch(v, dtype=torch.float32, device=x.device) if b is not None else None
    for v0 in range(0, v, vc):
        v1 = min(v, v0 + vc)
        dz = ws[: n * (v1 - v0)].view(n, v1 - v0)
        grid = (triton.cdiv(n, bm), triton.cdiv(v1 - v0, bn))
        _linear_dz_kernel[grid](
            x, w, b if b is not None else x, labels, lse, ent, g_lp, g_h, dz,
            n, v, h, v0, v1 - v0, x.stride(0), w.stride(0), dz.stride(0), inv_t,
            HAS_BIAS=b is not None, IEEE=x.dtype == torch.float32 or interpreting(),
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=8, num_stages=3,
        )
        check_written("linear_logprob_entropy dZ kernel", dz=dz)
        torch.mm(dz.t(), x, out=dw[v0:v1])  # GEMM reduces over all N in fp32, one rounding
        mm_acc_(dx32, dz, w[v0:v1])
        if db is not None:
            db[v0:v1] = dz.sum(0, dtype=torch.float32)
    check_written("linear_logprob_entropy recompute backward", dw=dw, db=db)
    return dx32.to(x.dtype), dw, db


def _triton_fused(x, w, b, labels, inv_t, chunk, grad_fn):
    """6NHV loss-fused pass: per token chunk the stats kernel also stores the fp32 logits, grad_fn gives
    the per-token upstream gradients, the row kernel turns the stored logits into dZ, two GEMMs follow."""
    n, h = x.shape
    v = w.shape[0]
    zbuf = scratch(min(chunk, n), v, dtype=torch.float32, device=x.device)
    dzbuf = zbuf if w.dtype == torch.float32 else scratch(min(chunk, n), v, dtype=w.dtype, device=x.device)
    logp = scratch(n, dtype=torch.float32, device=x.device)
    ent = scratch_like(logp)
    lse = scratch_like(logp)
    dx = scratch_like(x)
    dw = torch.zeros(v, h, dtype=torch.float32, device=x.device)
    db = torch.zeros(v, dtype=torch.float32, device=x.device) if b is not None else None
    for a in range(0, n, chunk):
        e_ = min(n, a + chunk)
        xc, lab = x[a:e_], labels[a:e_]
        z = zbuf[: e_ - a]
        lp, en, ls = _triton_stats(xc, w, b, lab, inv_t, z_out=z)
        logp[a:e_], ent[a:e_], lse[a:e_] = lp, en, ls
        g_lp, g_h = grad_fn(a, e_, lp, en)
        dz = dzbuf[: e_ - a]
        triton_row_grad(z, lab, ls, en, g_lp.float().contiguous(), g_h.float().contiguous(), inv_t, dz, z_scale=1.0)
        check_written("linear_logprob_entropy row-grad kernel", dz=dz)
        torch.mm(dz, w, out=dx[a:e_])
        mm_acc_(dw, dz.t(), xc)
        if db is not None:
            db.add_(dz.sum(0, dtype=torch.float32))
    check_written("linear_logprob_entropy fused pass", logp=logp, entropy=ent, lse=lse, dx=dx)
    return logp, ent, lse, dx, dw, db


# ----------------------------------------------------------------------------------------------
# autograd + entry points


def _prepare(hidden, weight, labels, bias, temperature):
    check_float("hidden", hidden)
    check_float("weight", weight)
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a dtype")
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"weight must be [V, H={hidden.shape[-1]}], got {tuple(weight.shape)}")
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"labels shape {tuple(labels.shape)} != hidden.shape[:-1] {tuple(hidden.shape[:-1])}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must be [V={weight.shape[0]}], got {tuple(bias.shape)}")
    if temperature <= 0:
        raise ValueError("temperature must be > 0")
    x = hidden.reshape(-1, hidden.shape[-1]).contiguous()
    return x, weight.contiguous(), labels.reshape(-1).contiguous(), None if bias is None else bias.contiguous()


def _chunk_for(x, w, chunk_size, triton_path):
    if chunk_size is not None:
        return max(1, int(chunk_size))
    n, v = x.shape[0], w.shape[0]
    if triton_path:  # fp32 logits + dZ workspace, ~512 MB
        return balanced_chunk_rows(n, v, 4 + (0 if w.dtype == torch.float32 else w.element_size()), 512 << 20)
    return cpu_chunk_rows(n, v, w.dtype)


class _Call(NamedTuple):
    """One call of the op, flattened and dispatched: inputs [N, H] / [V, H] / [N] / [V], 1/T, the path."""

    x: torch.Tensor
    w: torch.Tensor
    labels: torch.Tensor
    b: torch.Tensor | None
    inv_t: float
    chunk: int
    triton: bool
    compiled: bool

    def stats(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logp, entropy, lse) per token, no gradient."""
        if self.triton:
            return _triton_stats(self.x, self.w, self.b, self.labels, self.inv_t)
        return torch_pass(self.x, self.w, self.b, self.labels, self.inv_t, self.chunk, compiled=self.compiled)

    def recompute_backward(self, lse, ent, g_lp, g_h):
        """(dX, dW, db) from the saved (lse, entropy) and the upstream gradients."""
        if self.triton:
            return _triton_recompute_backward(self.x, self.w, self.b, self.labels, lse, ent, g_lp, g_h, self.inv_t)
        saved = (lse, ent, g_lp, g_h)
        return torch_pass(self.x, self.w, self.b, self.labels, self.inv_t, self.chunk, saved=saved,
                          compiled=self.compiled)  # fmt: skip


def _plan(hidden, weight, labels, bias, temperature, chunk_size, backend) -> _Call:
    x, w, lab, b = _prepare(hidden, weight, labels, bias, temperature)
    tp = use_triton(x, backend)
    compiled = not tp and backend_choice(backend) == "torch_compile"
    return _Call(x, w, lab, b, 1.0 / float(temperature), _chunk_for(x, w, chunk_size, tp), tp, compiled)


class LinearLogprobEntropyFunction(torch.autograd.Function):
    """Generic op: forward keeps (lse, entropy); backward recomputes logits per chunk / vocab slice."""

    @staticmethod
    def forward(ctx, x, w, b, labels, call):
        logp, ent, lse = call.stats()
        ctx.save_for_backward(x, w, b, labels, lse, ent)  # tensors through autograd (saved-tensor hooks see them)
        ctx.settings = call[4:]  # (inv_t, chunk, triton, compiled): the tensors go through save_for_backward
        return logp, ent

    @staticmethod
    def backward(ctx, g_lp, g_h):
        x, w, b, labels, lse, ent = ctx.saved_tensors
        n = x.shape[0]
        g_lp = torch.zeros(n, device=x.device) if g_lp is None else g_lp.float().contiguous()
        g_h = torch.zeros(n, device=x.device) if g_h is None else g_h.float().contiguous()
        call = _Call(x, w, labels, b, *ctx.settings)
        dx, dw, db = call.recompute_backward(lse, ent, g_lp, g_h)
        return dx, dw.to(w.dtype), None if db is None else db.to(b.dtype), None, None


def linear_logprob_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    backend: Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token logp of ``labels`` and entropy of softmax((hidden @ weight.T + bias) / temperature).

    Args:
        hidden: [..., H] fp32 / bf16 / fp16. weight: [V, H] (lm_head), same dtype. bias: optional [V].
        labels: [...] target ids; ids outside [0, V) give logp 0 and no logp gradient.
        chunk_size: tokens per chunk (bounds the live logits to chunk·V); default from a memory budget.
        backend: "auto" (Triton on CUDA, chunked torch on CPU), "triton", "torch" or "torch_compile"
            (the torch path with its CPU epilogue compiled by inductor).

    Returns:
        (logp, entropy): float32 [...], differentiable w.r.t. hidden, weight and bias with arbitrary
        upstream gradients for both. Memory: one chunk of logits, never [N, V]. dW: on Triton accumulated in
        fp32; on the CPU path accumulated across chunks in the weight's dtype by the GEMM (one rounding of
        the running sum per chunk, see ``linear_cpu``).
    """
    call = _plan(hidden, weight, labels, bias, temperature, chunk_size, backend)
    logp, ent = LinearLogprobEntropyFunction.apply(call.x, call.w, call.b, call.labels, call)
    return logp.view(labels.shape), ent.view(labels.shape)


def linear_logprob_entropy_with_grad(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    grad_fn: GradFn,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    backend: Backend = "auto",
    mode: str = "in_forward",
):
    """Forward and backward in one call when the upstream gradients are a per-token function.

    ``grad_fn(start, end, logp, entropy)`` returns (dL/dlogp, dL/dH) for flattened tokens [start, end);
    it is called while those tokens' logits are live (mode "in_forward", 6·N·H·V), or once for all tokens
    after a stats pass (mode "recompute", 8·N·H·V but no fp32 dW accumulator on the Triton path).

    Returns (logp, entropy, dX, dW, db) with logp/entropy fp32 [N], dX like hidden ([N, H]), dW [V, H]
    (Triton in-forward: accumulated and returned in fp32; Triton recompute: in the weight dtype, each vocab
    slice written once by one fp32-accumulating GEMM; CPU: in the weight dtype, accumulated across chunks
    by the GEMM itself), db fp32 [V] or None. Nothing here is tracked by autograd.
    """
    call = _plan(hidden, weight, labels, bias, temperature, chunk_size, backend)
    x, w, b, lab, inv_t, chunk = call.x, call.w, call.b, call.labels, call.inv_t, call.chunk
    with torch.no_grad():
        if mode == "recompute":
            logp, ent, lse = call.stats()
            g_lp, g_h = grad_fn(0, x.shape[0], logp, ent)
            dx, dw, db = call.recompute_backward(lse, ent, g_lp.float().contiguous(), g_h.float().contiguous())
            return logp, ent, dx, dw, db
        if mode != "in_forward":
            raise ValueError(f"mode must be 'in_forward' or 'recompute', got {mode!r}")
        if call.triton:
            logp, ent, _lse, dx, dw, db = _triton_fused(x, w, b, lab, inv_t, chunk, grad_fn)
        else:
            logp, ent, _lse, dx, dw, db = torch_pass(x, w, b, lab, inv_t, chunk, grad_fn=grad_fn,
                                                     compiled=call.compiled)  # fmt: skip
        return logp, ent, dx, dw, db


def linear_logprob_entropy_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    backend: Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward only, no autograd (2·N·H·V): old/ref log-probs, and the stats pass of Clip-Cov/KL-Cov."""
    call = _plan(hidden, weight, labels, bias, temperature, chunk_size, backend)
    with torch.no_grad():
        logp, ent, _ = call.stats()
    return logp.view(labels.shape), ent.view(labels.shape)
