"""Token covariance and the Clip-Cov / KL-Cov selection masks, entirely on device.

Why: the reference code (verl / PRIME-RL) selects with ``.item()``, ``nonzero``, a CPU ``randperm`` and
a CPU ``topk`` — 2-3 host synchronisations per micro-batch that also break CUDA graphs. Here every
count stays a device tensor and every shape is static:

* cov = (A − mean_m A)·(logp − mean_m logp) with masked means as device reductions;
* Clip-Cov: each candidate (lb < cov < ub, valid, not already PPO-clipped) gets an i.i.d. U(0, 1) key
  from a seeded generator, everything else −inf; the top-k keys are a uniformly random k-subset of the
  candidates. k = max(⌊ratio·n_valid⌋, 1) is a device scalar, so "top-k" is a rank test after one
  ``argsort`` (rank < k), capped automatically at the number of candidates;
* KL-Cov: the same rank test on cov itself (largest k over valid tokens, plain means).
"""

from __future__ import annotations

import torch

from .utils import HAS_TRITON, Backend, check_written, scratch, scratch_like, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _cov_keys_kernel(
        logp_ptr, adv_ptr, mask_ptr, clip_ptr, rand_ptr, sums_ptr, keys_ptr, n, lb, ub, eps,
        USE_RAND: tl.constexpr, BLOCK: tl.constexpr,
    ):
        """keys = rand (Clip-Cov, candidates only) or cov (KL-Cov, valid tokens only), −inf elsewhere.
        ``sums`` = [Σm·A, Σm·logp, Σm] on device: no host round trip for the means."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < n
        sa = tl.load(sums_ptr)
        sl = tl.load(sums_ptr + 1)
        sm = tl.load(sums_ptr + 2)
        den = sm + eps
        a = tl.load(adv_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        lp = tl.load(logp_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        m = tl.load(mask_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        cov = (a - sa / den) * (lp - sl / den)
        if USE_RAND:
            clipped = tl.load(clip_ptr + offs, mask=ok, other=0) != 0
            cand = (m > 0) & (cov > lb) & (cov < ub) & (~clipped)
            key = tl.where(cand, tl.load(rand_ptr + offs, mask=ok, other=0.0), float("-inf"))
        else:
            key = tl.where(m > 0, cov, float("-inf"))
        tl.store(keys_ptr + offs, key, mask=ok)


def _masked_sums(logp: torch.Tensor, adv: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return torch.stack([(adv * m).sum(), (logp * m).sum(), m.sum()])


def _keys(logp, adv, m, clipped, rand, lb, ub, eps, triton_path):
    sums = _masked_sums(logp, adv, m)
    if triton_path:
        n = logp.numel()
        keys = scratch(n, device=logp.device, dtype=torch.float32)
        block = 1024
        _cov_keys_kernel[(triton.cdiv(n, block),)](
            logp, adv, m, clipped.view(torch.uint8) if clipped is not None else m, rand if rand is not None else m,
            sums, keys,
            n, float(lb), float(ub), float(eps), USE_RAND=rand is not None, BLOCK=block,
        )
        check_written("cov keys kernel", keys=keys)
        return keys
    den = sums[2] + eps
    cov = (adv - sums[0] / den) * (logp - sums[1] / den)
    if rand is None:
        return torch.where(m > 0, cov, torch.full_like(cov, -torch.inf))
    cand = (m > 0) & (cov > lb) & (cov < ub) & ~clipped
    return torch.where(cand, rand, torch.full_like(rand, -torch.inf))


def _top_k_by_rank(keys: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Bool mask of the k largest finite keys; k is a device scalar (no sync, static shapes)."""
    order = torch.argsort(keys, descending=True, stable=True)
    rank = scratch_like(order)
    rank.scatter_(0, order, torch.arange(keys.numel(), device=keys.device))
    return (rank < k) & torch.isfinite(keys)


def _k_of(ratio: float, m: torch.Tensor) -> torch.Tensor:
    """max(⌊ratio·n_valid⌋, 1) in float64 on device, as Python's int(ratio * n) would round it."""
    n_valid = m.sum(dtype=torch.float64)
    return torch.clamp(torch.floor(n_valid * ratio), min=1).to(torch.int64)


def _flat(*ts: torch.Tensor) -> list[torch.Tensor]:
    return [t.reshape(-1).float().contiguous() for t in ts]


def token_cov(logp: torch.Tensor, advantages: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """cov = (A − masked_mean(A))·(logp − masked_mean(logp)), masked means over the whole micro-batch."""
    lp, a, m = _flat(logp.detach(), advantages, response_mask)
    sums = _masked_sums(lp, a, m)
    den = sums[2] + 1e-8
    return ((a - sums[0] / den) * (lp - sums[1] / den)).view(logp.shape)


def clip_cov_mask(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    clip_ratio_low: float = 0.2,
    clip_ratio_high: float = 0.2,
    clip_cov_ratio: float = 2e-4,
    clip_cov_lb: float = 1.0,
    clip_cov_ub: float = 5.0,
    generator: torch.Generator | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Tokens whose loss and gradient Clip-Cov drops (verl ``compute_policy_loss_clip_cov``'s corr = 0).

    Candidates: valid, lb < cov < ub (strict), and not already clipped by PPO (l2 > l1 with the
    unclamped ratio). min(max(⌊clip_cov_ratio·n_valid⌋, 1), #candidates) of them are chosen uniformly
    at random without replacement, from ``generator`` (a torch.Generator on the tensors' device; None
    uses the device's default generator). All tensors [B, L]; returns a bool [B, L] mask. No host sync.
    """
    shape = logp.shape
    lp, old, a, m = _flat(logp.detach(), old_logp, advantages, response_mask)
    ratio = torch.exp(lp - old)
    l1 = -a * ratio
    l2 = -a * torch.clamp(ratio, 1 - clip_ratio_low, 1 + clip_ratio_high)
    clipped = (l2 > l1) & (m > 0)
    rand = torch.rand(lp.shape, generator=generator, device=lp.device, dtype=torch.float32)
    keys = _keys(lp, a, m, clipped, rand, clip_cov_lb, clip_cov_ub, 1e-8, use_triton(lp, backend))
    return _top_k_by_rank(keys, _k_of(clip_cov_ratio, m)).view(shape)


def kl_cov_mask(
    logp: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    kl_cov_ratio: float = 2e-4,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Tokens KL-Cov penalises: the max(⌊kl_cov_ratio·n_valid⌋, 1) valid tokens of largest cov (plain
    means over valid tokens; verl's ``kl_cov_ratio`` is a fraction — PRIME-RL's ``k_percent`` is
    100×). Ties go to the lower flat index. All tensors [B, L]; returns a bool [B, L] mask. No host sync."""
    shape = logp.shape
    lp, a, m = _flat(logp.detach(), advantages, response_mask)
    keys = _keys(lp, a, m, None, None, 0.0, 0.0, 0.0, use_triton(lp, backend))
    return _top_k_by_rank(keys, _k_of(kl_cov_ratio, m)).view(shape)
