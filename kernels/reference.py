"""Plain-torch oracles for every op of ``spear_kernels``.

They materialise everything in float32 and let autograd do the backward, so they are slow and
memory-hungry on purpose: they are the definition the kernels are tested against. The formulas
follow verl 0.9 ``core_algos`` (docs/algorithm.md, 'Policy loss'), written as
literally as possible (``torch.clamp``/``maximum``/``where`` so that autograd's tie rules apply).
The loss aggregation is not written a second time here: it is the package's one definition of verl
0.9's ``agg_loss`` (``spear_kernels.agg_scale`` / ``agg_loss``), tested against verl and by hand.
"""

from __future__ import annotations

from typing import Any

import torch

from .utils import agg_scale

LOSS_MODES = ("vanilla", "clip_cov", "kl_cov", "gpg")
_AGG_INFO = ("dp_size", "batch_num_tokens", "global_batch_size", "loss_scale_factor")


def logprob_entropy_ref(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0, compute_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """logp[label] and entropy of softmax(logits / T) in ``compute_dtype`` (float64 for logits so large
    that lse − Σp·z cancels in fp32); labels outside [0, V) give logp 0."""
    z = logits.to(compute_dtype) / temperature
    logsm = torch.log_softmax(z, dim=-1)
    valid = (labels >= 0) & (labels < z.shape[-1])
    safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
    logp = logsm.gather(-1, safe.unsqueeze(-1)).squeeze(-1) * valid
    entropy = torch.logsumexp(z, dim=-1) - (torch.softmax(z, dim=-1) * z).sum(-1)
    return logp, entropy


def linear_logprob_entropy_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same from hidden states: logits = hidden @ weight.T (+ bias), all in float32."""
    logits = hidden.float() @ weight.float().t()
    if bias is not None:
        logits = logits + bias.float()
    return logprob_entropy_ref(logits, labels, temperature)


def masked_mean_ref(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """verl_F.masked_mean: sum(x·m) / (sum(m) + 1e-8)."""
    return (x * mask).sum() / (mask.sum() + 1e-8)


def token_cov_ref(logp: torch.Tensor, advantages: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Clip-Cov covariance: (A − mean_m A)(logp − mean_m logp), masked means over the micro-batch."""
    m = response_mask.float()
    lp = logp.detach().float()
    a = advantages.float()
    return (a - masked_mean_ref(a, m)) * (lp - masked_mean_ref(lp, m))


def clip_cov_candidates_ref(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    clip_ratio_low: float,
    clip_ratio_high: float,
    clip_cov_lb: float,
    clip_cov_ub: float,
    clip_cov_ratio: float,
) -> tuple[torch.Tensor, int]:
    """verl's candidate set and n_clip (the oracle of what clip_cov_mask may choose from)."""
    m = response_mask.float()
    a = advantages.float()
    ratio = torch.exp(logp.detach().float() - old_logp.float())
    l1 = -a * ratio
    l2 = -a * torch.clamp(ratio, 1 - clip_ratio_low, 1 + clip_ratio_high)
    clipped = (l2 > l1) & (m > 0)
    cov = token_cov_ref(logp, a, m)
    cov[m == 0] = -torch.inf
    cov[clipped] = -torch.inf
    n_clip = max(int(clip_cov_ratio * m.sum().item()), 1)
    cand = (cov < clip_cov_ub) & (cov > clip_cov_lb) & (m > 0)
    return cand, n_clip


def kl_cov_selected_ref(
    logp: torch.Tensor, advantages: torch.Tensor, response_mask: torch.Tensor, kl_cov_ratio: float
) -> torch.Tensor:
    """verl's KL-Cov selection (valid tokens copied out, plain means, top-k by cov), as a bool mask."""
    valid = response_mask > 0
    lp = logp.detach().float()[valid]
    a = advantages.float()[valid]
    out = torch.zeros_like(response_mask, dtype=torch.bool)
    if lp.numel() == 0:
        return out
    cov = (a - a.mean()) * (lp - lp.mean())
    k = max(1, int(lp.numel() * kl_cov_ratio))
    idx = torch.topk(cov, min(k, lp.numel()), largest=True).indices
    flat = torch.nonzero(valid.flatten()).squeeze(-1)[idx]
    out.view(-1)[flat] = True
    return out


def policy_loss_ref(
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
    selected: torch.Tensor | None = None,
    ppo_kl_coef: float = 1.0,
    **agg_info: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token loss of verl's vanilla / clip_cov / kl_cov / gpg, times ``weights``, aggregated.

    ``selected`` is the clip_cov detach set (corr = 0) or the kl_cov top-k set; the selections themselves
    are random / data-dependent and are tested separately. ``agg_info``: the global counts of the
    aggregation (``dp_size``, ``batch_num_tokens``, ``global_batch_size``, ``loss_scale_factor``), which is
    the package's one definition (``utils.agg_scale``, verl 0.9; tested against verl and by hand
    elsewhere). Returns (loss, per-token loss).
    """
    a = advantages.float()
    lp = logp.float()
    old = old_logp.float()
    m = response_mask.float()
    if loss_mode == "vanilla":
        neg_kl = torch.clamp(lp - old, -20.0, 20.0)
        ratio = torch.exp(neg_kl)
        l1 = -a * ratio
        l2 = -a * torch.clamp(ratio, 1 - clip_ratio_low, 1 + clip_ratio_high)
        lc = torch.maximum(l1, l2)
        l3 = torch.min(-a * clip_ratio_c, lc)
        loss = torch.where(a < 0, l3, lc)
    elif loss_mode == "clip_cov":
        ratio = torch.exp(lp - old)
        l1 = -a * ratio
        l2 = -a * torch.clamp(ratio, 1 - clip_ratio_low, 1 + clip_ratio_high)
        corr = torch.ones_like(lp) if selected is None else (~selected).float()
        loss = torch.maximum(l1, l2) * corr
    elif loss_mode == "kl_cov":
        ratio = torch.exp(lp - old)
        loss = -a * ratio
        if selected is not None:
            loss = torch.where(selected, loss + ppo_kl_coef * (lp - old).abs(), loss)
    elif loss_mode == "gpg":
        loss = -a * lp
    else:
        raise ValueError(f"unknown loss_mode {loss_mode!r}")
    if weights is not None:
        loss = loss * weights.float()
    return (loss * agg_scale(m, loss_agg_mode, **agg_info)).sum(), loss


def fused_linear_policy_loss_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    entropy_coeff: float = 0.0,
    entropy_weights: torch.Tensor | None = None,
    **loss_kwargs,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden → logp/entropy → pg_loss − entropy_coeff·agg(H). Returns (loss, logp, entropy)."""
    shape = labels.shape
    logp, ent = linear_logprob_entropy_ref(
        hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1), bias, temperature
    )
    logp, ent = logp.view(shape), ent.view(shape)
    pg, _ = policy_loss_ref(logp, old_logp, advantages, response_mask, **loss_kwargs)
    loss = pg
    if entropy_coeff != 0.0:
        h = ent if entropy_weights is None else ent * entropy_weights.float()
        info = {k: loss_kwargs[k] for k in _AGG_INFO if k in loss_kwargs}
        scale = agg_scale(response_mask, loss_kwargs.get("loss_agg_mode", "token-mean"), **info)
        loss = loss - entropy_coeff * (h * scale).sum()
    return loss, logp, ent
