"""Fused SIL-weighted PPO-family policy loss, and the fully fused hidden → loss → gradients path.

Why: every per-token quantity the loss needs (logp, old_logp, A, mask, weights) is known up front and
the aggregation only scales each token by a factor that depends on the mask alone, so dL/dlogp is
available in the same pass that computes the loss. ``policy_loss`` computes both in one kernel;
``fused_linear_policy_loss`` goes further and hands that per-token gradient to the lm_head pass while
the logits are still live (backward inside the forward, 6·N·H·V). Clip-Cov / KL-Cov need micro-batch
statistics of logp first, so they take one extra forward-only stats pass (8·N·H·V).

Semantics are verl 0.9's (docs/algorithm.md, 'Policy loss'):
  vanilla  δ = clamp(logp − old, ±20), r = e^δ, l = max(−A·r, −A·clip(r, 1−ε_l, 1+ε_h)),
           dual-clip l = min(l, −A·c) where A < 0;
  clip_cov no δ clamp, no dual-clip, l = max(l1, l2)·corr with corr = 0 on the clip_cov_mask tokens;
  kl_cov   l = −A·r + β·|logp − old| on the kl_cov_mask tokens, −A·r elsewhere, no clipping;
  gpg      l = −A·logp.
The per-token ``weights`` (replay coefficient c(t) on replay rows, importance weights) multiply the
per-token loss before aggregation. The aggregation is verl 0.9's ``agg_loss`` (global counts included)
in its per-token form, ``utils.agg_scale``. Gradients flow to logp (and hidden / weight) only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .cov_clip import clip_cov_mask, kl_cov_mask
from .linear_logprob_entropy import linear_logprob_entropy_stats, linear_logprob_entropy_with_grad
from .utils import HAS_TRITON, Backend, agg_scale, check_written, scratch, scratch_like, use_triton

LOSS_MODES = {"vanilla": 0, "clip_cov": 1, "kl_cov": 2, "gpg": 3}

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _token_loss_kernel(
        lp_ptr, old_ptr, adv_ptr, sel_ptr, w_ptr, scale_ptr, loss_ptr, grad_ptr, flag_ptr, kl_ptr, n,
        lo, hi, clip_c, kl_coef,
        MODE: tl.constexpr, HAS_W: tl.constexpr, BLOCK: tl.constexpr,
    ):
        """Per token: w·l, the aggregation-scaled gradient s·w·dl/dlogp, clip flags and the ppo_kl term.

        Ties between branches split the gradient in half, as torch.maximum / minimum do."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < n
        lp = tl.load(lp_ptr + offs, mask=ok, other=0.0)
        old = tl.load(old_ptr + offs, mask=ok, other=0.0)
        a = tl.load(adv_ptr + offs, mask=ok, other=0.0)
        s = tl.load(scale_ptr + offs, mask=ok, other=0.0)
        sel = tl.load(sel_ptr + offs, mask=ok, other=0) != 0
        w = tl.load(w_ptr + offs, mask=ok, other=0.0) if HAS_W else 1.0
        d_raw = lp - old
        flag = tl.zeros((BLOCK,), tl.int8)
        if MODE == 3:  # gpg
            loss = -a * lp
            dl = -a
            kl = -d_raw
        elif MODE == 2:  # kl_cov
            r = tl.exp(d_raw)
            absd = tl.abs(d_raw)
            sign = tl.where(d_raw > 0, 1.0, tl.where(d_raw < 0, -1.0, 0.0))
            loss = -a * r + tl.where(sel, kl_coef * absd, 0.0)
            dl = -a * r + tl.where(sel, kl_coef * sign, 0.0)
            kl = absd
        else:
            if MODE == 0:
                d = tl.minimum(tl.maximum(d_raw, -20.0), 20.0)
                r = tl.exp(d)
                dr = tl.where((d_raw >= -20.0) & (d_raw <= 20.0), r, 0.0)
            else:
                r = tl.exp(d_raw)
                dr = r
            rc = tl.minimum(tl.maximum(r, lo), hi)
            drc = tl.where((r >= lo) & (r <= hi), dr, 0.0)
            l1 = -a * r
            l2 = -a * rc
            lc = tl.maximum(l1, l2)
            dlc = tl.where(l1 > l2, -a * dr, tl.where(l1 < l2, -a * drc, -0.5 * a * (dr + drc)))
            flag = tl.where(l2 > l1, 1, 0).to(tl.int8)
            kl = -d_raw
            if MODE == 0:
                kl = -d  # verl's vanilla ppo_kl uses the clamped log-ratio
                l3 = -a * clip_c
                dual = a < 0
                loss = tl.where(dual, tl.minimum(lc, l3), lc)
                dl = tl.where(dual, tl.where(lc < l3, dlc, tl.where(lc > l3, 0.0, 0.5 * dlc)), dlc)
                flag = flag | tl.where(dual & (lc > l3), 2, 0).to(tl.int8)
            else:
                kl = -d_raw
                loss = tl.where(sel, 0.0, lc)
                dl = tl.where(sel, 0.0, dlc)
                flag = tl.where(sel, 1, 0).to(tl.int8)
        active = s != 0.0  # masked tokens: exact zeros even if their inputs overflow (no 0·inf NaN)
        tl.store(loss_ptr + offs, tl.where(active, w * loss, 0.0), mask=ok)
        tl.store(grad_ptr + offs, tl.where(active, s * w * dl, 0.0), mask=ok)
        tl.store(flag_ptr + offs, flag, mask=ok)
        tl.store(kl_ptr + offs, kl, mask=ok)


def _token_terms_torch(lp, old, a, sel, w, s, mode, lo, hi, clip_c, kl_coef):
    d_raw = lp - old
    zero = torch.zeros_like(lp)
    flag = torch.zeros(lp.shape, dtype=torch.int8, device=lp.device)
    if mode == "gpg":
        loss, dl, kl = -a * lp, -a, -d_raw
    elif mode == "kl_cov":
        r = torch.exp(d_raw)
        loss = -a * r + torch.where(sel, kl_coef * d_raw.abs(), zero)
        dl = -a * r + torch.where(sel, kl_coef * torch.sign(d_raw), zero)
        kl = d_raw.abs()
    else:
        if mode == "vanilla":
            r = torch.exp(d_raw.clamp(-20.0, 20.0))
            dr = torch.where((d_raw >= -20.0) & (d_raw <= 20.0), r, zero)
        else:
            r = torch.exp(d_raw)
            dr = r
        rc = r.clamp(lo, hi)
        drc = torch.where((r >= lo) & (r <= hi), dr, zero)
        l1, l2 = -a * r, -a * rc
        lc = torch.maximum(l1, l2)
        dlc = torch.where(l1 > l2, -a * dr, torch.where(l1 < l2, -a * drc, -0.5 * a * (dr + drc)))
        kl = -d_raw.clamp(-20.0, 20.0) if mode == "vanilla" else -d_raw  # verl: vanilla's ppo_kl is clamped
        if mode == "vanilla":
            l3 = -a * clip_c
            dual = a < 0
            loss = torch.where(dual, torch.minimum(lc, l3), lc)
            dl = torch.where(dual, torch.where(lc < l3, dlc, torch.where(lc > l3, zero, 0.5 * dlc)), dlc)
            flag = (l2 > l1).to(torch.int8) | ((dual & (lc > l3)).to(torch.int8) * 2)
        else:
            loss = torch.where(sel, zero, lc)
            dl = torch.where(sel, zero, dlc)
            flag = sel.to(torch.int8)
    if w is not None:
        loss, dl = loss * w, dl * w
    active = s != 0  # masked tokens: exact zeros even if their inputs overflow (no 0·inf NaN)
    return torch.where(active, loss, zero), torch.where(active, s * dl, zero), flag, kl


def token_loss_terms(lp, old, a, sel, w, s, mode, lo, hi, clip_c, kl_coef, triton_path):
    """(w·l, s·w·dl/dlogp, flags, ppo_kl term) for flat fp32 token vectors; s = aggregation scale·mask."""
    if not triton_path:
        return _token_terms_torch(lp, old, a, sel, w, s, mode, lo, hi, clip_c, kl_coef)
    n = lp.numel()
    loss = scratch_like(lp)
    grad = scratch_like(lp)
    kl = scratch_like(lp)
    flag = scratch(n, dtype=torch.int8, device=lp.device)
    if n:
        block = 1024
        _token_loss_kernel[(triton.cdiv(n, block),)](
            lp, old, a, sel.view(torch.uint8) if sel.dtype == torch.bool else sel, w if w is not None else lp, s,
            loss, grad, flag, kl, n, lo, hi, clip_c, kl_coef,
            MODE=LOSS_MODES[mode], HAS_W=w is not None, BLOCK=block,
        )
        check_written("policy loss token kernel", loss=loss, grad=grad, flag=flag, kl=kl)
    return loss, grad, flag, kl


@dataclass
class PolicyLossOutput:
    """loss: scalar (differentiable). Metrics are detached device scalars (no .item()):
    pg_clipfrac, pg_clipfrac_lower, ppo_kl as verl defines them per loss_mode; selected: the clip_cov /
    kl_cov token mask (None otherwise); logp / entropy: detached per-token values (fused path only)."""

    loss: torch.Tensor
    pg_clipfrac: torch.Tensor
    pg_clipfrac_lower: torch.Tensor
    ppo_kl: torch.Tensor
    selected: torch.Tensor | None = None
    logp: torch.Tensor | None = None
    entropy: torch.Tensor | None = None


def _metrics(flag, kl, m, mode):
    den = m.sum() + 1e-8
    clip = ((flag & 1) != 0).float()
    lower = ((flag & 2) != 0).float()
    zero = torch.zeros((), device=m.device)
    if mode == "gpg":
        return zero, zero, zero
    kl = torch.where(m > 0, kl, torch.zeros_like(kl))
    return (clip * m).sum() / den, (lower * m).sum() / den, (kl * m).sum() / den


class _PolicyLossFunction(torch.autograd.Function):
    """loss = Σ s·w·l; the gradient s·w·dl/dlogp is computed in the forward and scaled in the backward."""

    @staticmethod
    def forward(ctx, logp, loss_tok, scale, grad):
        ctx.save_for_backward(grad)
        ctx.shape, ctx.dtype = logp.shape, logp.dtype
        return (loss_tok * scale).sum()

    @staticmethod
    def backward(ctx, g):
        (grad,) = ctx.saved_tensors
        return (grad * g).view(ctx.shape).to(ctx.dtype), None, None, None


def _selection(mode, logp, old_logp, advantages, response_mask, selected, cfg, generator, backend):
    if mode not in LOSS_MODES:
        raise ValueError(f"unknown loss_mode {mode!r}; expected one of {tuple(LOSS_MODES)}")
    if selected is not None or mode in ("vanilla", "gpg"):
        return selected
    if mode == "clip_cov":
        return clip_cov_mask(
            logp, old_logp, advantages, response_mask, cfg["clip_ratio_low"], cfg["clip_ratio_high"],
            cfg["clip_cov_ratio"], cfg["clip_cov_lb"], cfg["clip_cov_ub"], generator=generator, backend=backend,
        )
    return kl_cov_mask(logp, advantages, response_mask, cfg["kl_cov_ratio"], backend=backend)


def _check_clip(clip_ratio_c: float, mode: str) -> None:
    if mode == "vanilla" and not clip_ratio_c > 1.0:
        raise ValueError(f"clip_ratio_c must be > 1 for dual-clip, got {clip_ratio_c}")


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_mode: str = "vanilla",
    loss_agg_mode: str = "token-mean",
    clip_ratio_low: float = 0.2,
    clip_ratio_high: float = 0.2,
    clip_ratio_c: float = 3.0,
    weights: torch.Tensor | None = None,
    clip_cov_ratio: float = 2e-4,
    clip_cov_lb: float = 1.0,
    clip_cov_ub: float = 5.0,
    kl_cov_ratio: float = 2e-4,
    ppo_kl_coef: float = 1.0,
    selected: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    dp_size: int = 1,
    batch_num_tokens: float | torch.Tensor | None = None,
    global_batch_size: float | torch.Tensor | None = None,
    loss_scale_factor: float | None = None,
    backend: Backend = "auto",
    denominator: float | torch.Tensor | None = None,
    norm_length: float | None = None,
) -> PolicyLossOutput:
    """PPO-family policy loss over a micro-batch, forward and backward in one pass.

    Args:
        logp: [B, L] current log-probs (requires grad). old_logp, advantages: [B, L]. response_mask: [B, L]
            0/1. weights: optional [B, L] (or broadcastable) per-token multipliers of the loss.
        loss_mode: vanilla | clip_cov | kl_cov | gpg. loss_agg_mode: token-mean | token-sum |
            seq-mean-token-sum | seq-mean-token-mean | seq-mean-token-sum-norm, verl 0.9's ``agg_loss``;
            ``dp_size``, ``batch_num_tokens``, ``global_batch_size``, ``loss_scale_factor`` are its global
            counts (see ``agg_scale``; ``denominator`` / ``norm_length``: deprecated names of
            ``batch_num_tokens`` / ``loss_scale_factor``).
        selected: optional precomputed clip_cov / kl_cov token mask; otherwise computed on device
            (Clip-Cov draws from ``generator``).
    Returns: PolicyLossOutput; ``loss.backward()`` gives d/dlogp without re-running anything.
    """
    _check_clip(clip_ratio_c, loss_mode)
    cfg = dict(clip_ratio_low=clip_ratio_low, clip_ratio_high=clip_ratio_high, clip_cov_ratio=clip_cov_ratio,
               clip_cov_lb=clip_cov_lb, clip_cov_ub=clip_cov_ub, kl_cov_ratio=kl_cov_ratio)
    sel = _selection(loss_mode, logp, old_logp, advantages, response_mask, selected, cfg, generator, backend)
    lp = logp.detach().reshape(-1).float().contiguous()
    old = old_logp.reshape(-1).float().contiguous()
    a = advantages.reshape(-1).float().contiguous()
    m = response_mask.reshape(-1).float()
    w = None if weights is None else torch.broadcast_to(weights, logp.shape).reshape(-1).float().contiguous()
    s = agg_scale(response_mask, loss_agg_mode, dp_size, batch_num_tokens, global_batch_size, loss_scale_factor,
                  denominator=denominator, norm_length=norm_length).reshape(-1).contiguous()
    sel_flat = (sel.reshape(-1) if sel is not None else torch.zeros_like(lp, dtype=torch.bool)).contiguous()
    loss_tok, grad, flag, kl = token_loss_terms(
        lp, old, a, sel_flat, w, s, loss_mode, 1 - clip_ratio_low, 1 + clip_ratio_high, clip_ratio_c,
        ppo_kl_coef, use_triton(lp, backend),
    )
    loss = _PolicyLossFunction.apply(logp, loss_tok, s, grad)
    clipfrac, lower, ppo_kl = _metrics(flag, kl, m, loss_mode)
    return PolicyLossOutput(loss, clipfrac, lower, ppo_kl, sel)


class _FusedLinearLossFunction(torch.autograd.Function):
    """Returns the precomputed loss; the backward scales the precomputed dX, dW, db by dL_out."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, loss, dx, dw, db):
        ctx.save_for_backward(dx, dw, db)
        ctx.meta = (hidden.shape, hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return loss

    @staticmethod
    def backward(ctx, g):
        dx, dw, db = ctx.saved_tensors
        shape, xdt, wdt, bdt = ctx.meta
        gx = (dx.float() * g).to(xdt).view(shape) if ctx.needs_input_grad[0] else None
        gw = dw.mul_(g).to(wdt) if ctx.needs_input_grad[1] else None
        gb = db.mul_(g).to(bdt) if db is not None and ctx.needs_input_grad[2] else None
        return gx, gw, gb, None, None, None, None


def fused_linear_policy_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    old_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    loss_mode: str = "vanilla",
    loss_agg_mode: str = "token-mean",
    clip_ratio_low: float = 0.2,
    clip_ratio_high: float = 0.2,
    clip_ratio_c: float = 3.0,
    weights: torch.Tensor | None = None,
    entropy_coeff: float = 0.0,
    entropy_weights: torch.Tensor | None = None,
    clip_cov_ratio: float = 2e-4,
    clip_cov_lb: float = 1.0,
    clip_cov_ub: float = 5.0,
    kl_cov_ratio: float = 2e-4,
    ppo_kl_coef: float = 1.0,
    generator: torch.Generator | None = None,
    dp_size: int = 1,
    batch_num_tokens: float | torch.Tensor | None = None,
    global_batch_size: float | torch.Tensor | None = None,
    loss_scale_factor: float | None = None,
    chunk_size: int | None = None,
    backward_mode: str = "in_forward",
    backend: Backend = "auto",
    denominator: float | torch.Tensor | None = None,
    norm_length: float | None = None,
) -> PolicyLossOutput:
    """hidden → logp / entropy → policy loss − entropy_coeff·agg(H) → gradients, without [N, V] logits.

    Args:
        hidden: [B, L, H] last hidden states (already shifted so that position k predicts labels[:, k]).
        weight: [V, H] lm_head; bias: optional [V]; labels: [B, L] target ids.
        old_logp, advantages, response_mask, weights: [B, L], and the aggregation, as in ``policy_loss``. ``old_logp=None``: the
            update is exactly on-policy (TRL's ``num_iterations=1``): the old log-probs are this pass's own,
            detached, so every ratio is 1; the returned ``logp`` is then what a separate pass would give.
        entropy_weights: optional [B, L] multipliers of the entropy bonus (for SPEAR replay rows the
            whole micro-batch loss is scaled by c(t): pass c(t) as both ``weights`` and
            ``entropy_weights``).
        backward_mode: "in_forward" (6·N·H·V; fp32 dW accumulator) or "recompute" (8·N·H·V; on the
            Triton path dW is written once per vocab slice, no V·H fp32 accumulator).
    The whole backward runs inside this call (plus one stats pass for clip_cov / kl_cov);
    ``loss.backward()`` only scales the stored gradients. Returns PolicyLossOutput with logp / entropy.
    """
    _check_clip(clip_ratio_c, loss_mode)
    if labels.dim() != 2:
        raise ValueError("labels (and the per-token tensors) must be [B, L]")
    cfg = dict(clip_ratio_low=clip_ratio_low, clip_ratio_high=clip_ratio_high, clip_cov_ratio=clip_cov_ratio,
               clip_cov_lb=clip_cov_lb, clip_cov_ub=clip_cov_ub, kl_cov_ratio=kl_cov_ratio)
    lin = dict(bias=None if bias is None else bias.detach(), temperature=temperature, chunk_size=chunk_size,
               backend=backend)
    sel = None
    if loss_mode in ("clip_cov", "kl_cov"):  # pass 1: micro-batch statistics of logp (2·N·H·V)
        lp0, _ = linear_logprob_entropy_stats(hidden.detach(), weight.detach(), labels, **lin)
        if old_logp is None:
            old_logp = lp0.view(labels.shape)
        sel = _selection(loss_mode, lp0, old_logp, advantages, response_mask, None, cfg, generator, backend)
    elif loss_mode not in LOSS_MODES:
        raise ValueError(f"unknown loss_mode {loss_mode!r}")
    n = labels.numel()
    dev = hidden.device
    on_policy = old_logp is None
    old = None if on_policy else old_logp.reshape(-1).float().contiguous()
    a = advantages.reshape(-1).float().contiguous()
    m = response_mask.reshape(-1).float()
    w = None if weights is None else torch.broadcast_to(weights, labels.shape).reshape(-1).float().contiguous()
    ew = None if entropy_weights is None else torch.broadcast_to(entropy_weights, labels.shape).reshape(-1).float()
    s = agg_scale(response_mask, loss_agg_mode, dp_size, batch_num_tokens, global_batch_size, loss_scale_factor,
                  denominator=denominator, norm_length=norm_length).reshape(-1).contiguous()
    sel_flat = (sel.reshape(-1) if sel is not None else torch.zeros(n, dtype=torch.bool, device=dev)).contiguous()
    loss_tok = scratch(n, dtype=torch.float32, device=dev)
    flags = scratch(n, dtype=torch.int8, device=dev)
    kls = scratch(n, dtype=torch.float32, device=dev)
    tp = use_triton(a, backend)
    lo, hi = 1 - clip_ratio_low, 1 + clip_ratio_high

    def grad_fn(i: int, j: int, lp: torch.Tensor, ent: torch.Tensor):
        lp = lp.contiguous()
        lt, g, f, k = token_loss_terms(
            lp, lp if old is None else old[i:j], a[i:j], sel_flat[i:j], None if w is None else w[i:j], s[i:j],
            loss_mode, lo, hi, clip_ratio_c, ppo_kl_coef, tp,
        )
        loss_tok[i:j], flags[i:j], kls[i:j] = lt, f, k
        g_h = -entropy_coeff * s[i:j]
        if ew is not None:
            g_h = g_h * ew[i:j]
        return g, g_h

    logp, ent, dx, dw, db = linear_logprob_entropy_with_grad(
        hidden.detach(), weight.detach(), labels, grad_fn, mode=backward_mode, **lin
    )
    check_written("fused_linear_policy_loss", loss=loss_tok, flags=flags, kl=kls)
    loss = (loss_tok * s).sum()
    if entropy_coeff != 0.0:
        h = ent if ew is None else ent * ew
        loss = loss - entropy_coeff * (h * s).sum()
    loss = _FusedLinearLossFunction.apply(hidden, weight, bias, loss, dx, dw, db)
    clipfrac, lower, ppo_kl = _metrics(flags, kls, m, loss_mode)
    return PolicyLossOutput(
        loss, clipfrac, lower, ppo_kl, sel, logp.view(labels.shape), ent.view(labels.shape)
    )
