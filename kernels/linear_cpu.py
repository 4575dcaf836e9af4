"""The torch (CPU) path of the fused lm_head + log-prob + entropy op, one token chunk of logits at a time.

Per chunk: one GEMM writes the chunk's logits, an fp32 epilogue computes the statistics and turns the
logits into dZ *in place*, then two GEMMs give dX (written once) and dW (accumulated across chunks in the
weight's own dtype by the GEMM itself, beta = 1). Extra memory: one logits chunk + dW.

dW in a half dtype: each chunk's GEMM accumulates in fp32 and rounds the running sum once. The CPU has no
half GEMM with an fp32 output; the alternative, an fp32 accumulator plus each chunk's product rounded to
bf16 and added to it, moved 6 bytes per dW element per chunk more and cost ~11 % of the three GEMMs' time
on a 2-core EPYC (bench/RESULTS.md), for a dW error of the same order as torch eager's (one rounding of
the full product).

Two epilogues, the same math:

* eager (``torch``): a loop over row blocks small enough to stay in cache, ~10 torch ops per block, each
  a pass over the block in fp32.
* compiled (``torch_compile``): the statistics and the gradient each fused by inductor into a loop over
  the whole chunk that reads the logits in their own dtype and, for the gradient, writes dZ back in it.
  No fp32 copy of the logits, no per-block dispatch: on a 2-core EPYC in bf16 the op is ~10 % faster
  at the same chunk (bench/RESULTS.md). It costs a compilation at first use per dtype (seconds to a minute,
  cached on disk by inductor) and needs a C++ compiler; without one it warns and runs the eager epilogue.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import torch

from .logprob_entropy import torch_row_grad_, torch_row_stats_
from .utils import check_written, mm_acc_, scratch, scratch_like

GradFn = Callable[[int, int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""grad_fn(start, end, logp, entropy) -> (dL/dlogp, dL/dentropy) for flattened tokens [start, end)."""


def chunk_logits(xc, w, b, inv_t, zbuf):
    """Logits of one token chunk into zbuf: in fp32 already divided by T, in a half dtype left unscaled
    (scaling there would round twice; the epilogue scales on load)."""
    z = zbuf[: xc.shape[0]]
    if b is None:
        torch.mm(xc, w.t(), out=z)
    else:
        torch.addmm(b, xc, w.t(), out=z)
    if inv_t != 1.0 and z.dtype == torch.float32:
        z.mul_(inv_t)
    return z


def exact_target_logits(xc, w, b, labels, inv_t):
    """fp32 target logit / T (the bf16 GEMM rounds the logits; the target term of logp must not be)."""
    v = w.shape[0]
    ok = (labels >= 0) & (labels < v)
    safe = torch.where(ok, labels, torch.zeros_like(labels)).long()
    zy = torch.linalg.vecdot(xc.float(), w[safe].float())
    if b is not None:
        zy = zy + b[safe].float()
    return zy * inv_t


ROW_BLOCK_BYTES = 4 << 20
"""fp32 bytes of logits per row block of the eager epilogue: small enough to stay in cache, large enough
that each torch op amortises its thread-pool dispatch (on a busy 2-core VM that costs ~1 ms an op)."""


def row_block(v: int) -> int:
    return max(1, ROW_BLOCK_BYTES // (4 * v)) if v else 1


# ----------------------------------------------------------------------------------------------
# compiled epilogue: the whole chunk per call, written for inductor to fuse


def chunk_stats(z, labels, zy, scale):
    """(logp, entropy, lse, m, s, t) of each row of z * scale, in fp32: m = row max, s = Σ exp(z·scale − m),
    t = Σ exp(·)(z·scale − m). ``zy``: the target logit (already scaled), exact where z was rounded."""
    v = z.shape[1]
    zf = z.float() * scale
    m = zf.amax(1)
    zs = zf - m[:, None]
    e = torch.exp(zs)
    s = e.sum(1)
    t = (e * zs).sum(1)
    log_s = torch.log(s)
    ok = (labels >= 0) & (labels < v)
    logp = torch.where(ok, zy - m - log_s, 0.0)
    return logp, log_s - t / s, m + log_s, m, s, t


def chunk_grad_(z, labels, c, s, t, g_lp, g_h, scale, inv_t) -> None:
    """In place: z becomes dlogits, in its own dtype. ``c``, ``s``, ``t`` as in ``torch_row_grad_`` (c = max
    with the forward statistics; c = lse, s = 1, t = −H when recomputing from saved ones)."""
    v = z.shape[1]
    zs = z.float() * scale - c[:, None]
    e = torch.exp(zs)
    ok = (labels >= 0) & (labels < v)
    g_lp = torch.where(ok, g_lp, 0.0)
    inv_s = 1.0 / s
    alpha = (-g_h * inv_s * inv_t)[:, None]
    beta = ((g_h * t * inv_s - g_lp) * inv_s * inv_t)[:, None]
    hit = torch.arange(v, device=z.device)[None, :] == labels[:, None]
    z.copy_(e * (alpha * zs + beta) + torch.where(hit, (g_lp * inv_t)[:, None], 0.0))


@functools.cache
def _inductor_epilogue() -> tuple[Callable, Callable] | str:
    """inductor versions of (chunk_stats, chunk_grad_), or why inductor cannot build them on this machine:
    tried once per process on a tiny input, before any real chunk depends on it."""
    stats = torch.compile(chunk_stats, dynamic=True)
    grad = torch.compile(chunk_grad_, dynamic=True)
    try:
        with torch.no_grad():  # as the op's own calls run: the same dynamo guards, no second compile
            z = torch.zeros(3, 5)
            one = torch.tensor(1.0)
            lab = torch.zeros(3, dtype=torch.long)
            _, _, _, m, s, t = stats(z, lab, torch.zeros(3), one)
            grad(z, lab, m, s, t, torch.zeros(3), torch.zeros(3), one, one)
    except Exception as e:  # inductor's failures (no compiler, a backend error) share no base class
        first_line = str(e).splitlines()[0] if str(e) else ""
        return f"inductor could not compile the CPU epilogue ({type(e).__name__}: {first_line})"
    return stats, grad


def compiled_epilogue_unavailable() -> str | None:
    """None when ``backend='torch_compile'`` really compiles here, else why not (the first call compiles a
    tiny probe)."""
    fns = _inductor_epilogue()
    return fns if isinstance(fns, str) else None


def _compiled() -> tuple[Callable, Callable] | None:
    fns = _inductor_epilogue()
    if isinstance(fns, str):
        warnings.warn(f"backend='torch_compile': {fns}; running the eager epilogue instead", RuntimeWarning, stacklevel=4)
        return None
    return fns


# ----------------------------------------------------------------------------------------------
# the chunk loop


def torch_pass(x, w, b, labels, inv_t, chunk, *, grad_fn=None, saved=None, want_grad=True, compiled=False):
    """The chunk loop shared by the three uses.

    * stats only (``grad_fn`` and ``saved`` None): returns (logp, entropy, lse).
    * loss-fused (``grad_fn``): stats and dZ from the same live logits, returns also dX, dW, db.
    * recompute backward (``saved`` = (lse, entropy, g_lp, g_H)): returns dX, dW, db.

    ``compiled``: the inductor epilogue (falls back to the eager one where inductor cannot build).
    """
    n, h = x.shape
    v = w.shape[0]
    half = w.dtype != torch.float32
    fns = _compiled() if compiled else None
    zbuf = scratch(min(chunk, n), v, dtype=w.dtype)
    need_grad = want_grad and (grad_fn is not None or saved is not None)
    if saved is None:
        logp = scratch(n, dtype=torch.float32)
        ent = scratch(n, dtype=torch.float32)
        lse = scratch(n, dtype=torch.float32)
    if need_grad:
        dx = scratch_like(x)
        dw = torch.zeros(v, h, dtype=w.dtype)
        db = torch.zeros(v, dtype=torch.float32) if b is not None else None
    for a in range(0, n, chunk):
        e_ = min(n, a + chunk)
        xc = x[a:e_]
        lab = labels[a:e_]
        z = chunk_logits(xc, w, b, inv_t, zbuf)
        saved_c = None if saved is None else tuple(u[a:e_] for u in saved)
        chunk_grad_fn = grad_fn if need_grad else None
        if fns is not None:
            stats = _compiled_chunk(fns, z, xc, w, b, lab, inv_t, a, chunk_grad_fn, saved_c)
        else:
            zy = exact_target_logits(xc, w, b, lab, inv_t) if half and saved is None else None
            stats = _eager_chunk(z, lab, inv_t, a, chunk_grad_fn, saved_c, zy)
        if saved is None:
            logp[a:e_], ent[a:e_], lse[a:e_] = stats
        if need_grad:
            torch.mm(z, w, out=dx[a:e_])
            mm_acc_(dw, z.t(), xc)  # same dtype: the GEMM adds into dW itself
            if db is not None:
                db.add_(z.sum(0, dtype=torch.float32))
    if saved is not None:
        check_written("linear_logprob_entropy torch backward", dx=dx)
        return dx, dw, db
    dx_out = dx if need_grad else None
    check_written("linear_logprob_entropy torch pass", logp=logp, entropy=ent, lse=lse, dx=dx_out)
    if grad_fn is None or not need_grad:
        return logp, ent, lse
    return logp, ent, lse, dx, dw, db


def _eager_chunk(z, lab, inv_t, a, grad_fn, saved, zy):
    """Row blocks of one chunk: statistics (returned, unless ``saved``), and dZ into z when a gradient is due."""
    rows = z.shape[0]
    half = z.dtype != torch.float32
    if saved is None:
        logp, ent, lse = (scratch(rows, dtype=torch.float32) for _ in range(3))
    rb = row_block(z.shape[1])
    for r in range(0, rows, rb):
        r2 = min(rows, r + rb)
        zr = z[r:r2]
        zf = zr.float() if half else zr
        if half and inv_t != 1.0:
            zf.mul_(inv_t)
        lr = lab[r:r2]
        if saved is None:
            lp, en, ls, ex, s, t = torch_row_stats_(zf, lr, None if zy is None else zy[r:r2])
            logp[r:r2], ent[r:r2], lse[r:r2] = lp, en, ls
            if grad_fn is None:
                continue
            g_lp, g_h = grad_fn(a + r, a + r2, lp, en)
        else:
            s_lse, s_ent, g_lp, g_h = (u[r:r2] for u in saved)
            zf.sub_(s_lse.unsqueeze(1))
            ex = torch.exp(zf)
            s, t = torch.ones_like(s_lse), -s_ent
        torch_row_grad_(zf, ex, s, t, lr, g_lp, g_h, inv_t)
        if half:
            zr.copy_(zf)
    return None if saved is not None else (logp, ent, lse)


def _compiled_chunk(fns, z, xc, w, b, lab, inv_t, a, grad_fn, saved):
    """The whole chunk through the inductor epilogue (see ``chunk_stats`` / ``chunk_grad_``)."""
    stats_kernel, grad_kernel = fns
    half = z.dtype != torch.float32
    scale = torch.tensor(inv_t if half else 1.0)  # fp32 logits are already / T
    it = torch.tensor(inv_t)
    if saved is not None:
        s_lse, s_ent, g_lp, g_h = saved
        grad_kernel(z, lab, s_lse, torch.ones_like(s_lse), -s_ent, g_lp, g_h, scale, it)
        return None
    if half:
        zy = exact_target_logits(xc, w, b, lab, inv_t)
    else:
        ok = (lab >= 0) & (lab < z.shape[1])
        zy = z.gather(1, torch.where(ok, lab, 0).long().unsqueeze(1)).squeeze(1)
    logp, ent, lse, m, s, t = stats_kernel(z, lab, zy, scale)
    if grad_fn is not None:
        g_lp, g_h = grad_fn(a, a + z.shape[0], logp, ent)
        grad_kernel(z, lab, m, s, t, g_lp.float(), g_h.float(), scale, it)
    return logp, ent, lse
