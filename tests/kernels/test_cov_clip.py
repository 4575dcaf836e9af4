import math

import pytest
import torch
from conftest import BACKENDS

from spear_kernels import clip_cov_mask, kl_cov_mask, token_cov
from spear_kernels.reference import clip_cov_candidates_ref, kl_cov_selected_ref, token_cov_ref

B, L = 6, 53


def _batch(seed=0, masked_row=True):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, L, generator=g) * 4
    old = logp + torch.randn(B, L, generator=g) * 0.3
    adv = torch.randn(B, 1, generator=g).expand(B, L) * 2 + torch.randn(B, L, generator=g) * 0.1
    mask = (torch.rand(B, L, generator=g) > 0.2).float()
    if masked_row:
        mask[3] = 0
    return logp, old, adv.contiguous(), mask


CFG = dict(clip_ratio_low=0.2, clip_ratio_high=0.28, clip_cov_ratio=0.02, clip_cov_lb=-0.5, clip_cov_ub=2.0)


def test_token_cov_matches_oracle():
    logp, _, adv, mask = _batch()
    torch.testing.assert_close(token_cov(logp, adv, mask), token_cov_ref(logp, adv, mask))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ratio", [0.02, 0.3, 1e-6, 1.0])
def test_clip_cov_exact_count_candidates_only(backend, ratio):
    logp, old, adv, mask = _batch()
    cfg = dict(CFG, clip_cov_ratio=ratio)
    g = torch.Generator().manual_seed(7)
    sel = clip_cov_mask(logp, old, adv, mask, **cfg, generator=g, backend=backend)
    cand, n_clip = clip_cov_candidates_ref(logp, old, adv, mask, **cfg)
    assert sel.shape == logp.shape and sel.dtype == torch.bool
    assert int(cand.sum()) > 0
    assert int(sel.sum()) == min(n_clip, int(cand.sum()))
    assert not (sel & ~cand).any()  # candidates only (never masked, never PPO-clipped, lb < cov < ub)


@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_cov_reproducible_for_a_seed(backend):
    logp, old, adv, mask = _batch()
    a = clip_cov_mask(logp, old, adv, mask, **CFG, generator=torch.Generator().manual_seed(3), backend=backend)
    b = clip_cov_mask(logp, old, adv, mask, **CFG, generator=torch.Generator().manual_seed(3), backend=backend)
    c = clip_cov_mask(logp, old, adv, mask, **CFG, generator=torch.Generator().manual_seed(4), backend=backend)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_clip_cov_no_candidates_selects_nothing():
    logp, old, adv, mask = _batch()
    sel = clip_cov_mask(logp, old, adv, mask, **dict(CFG, clip_cov_lb=1e6, clip_cov_ub=2e6))
    assert not sel.any()
    sel = clip_cov_mask(logp, old, adv, torch.zeros_like(mask), **CFG)
    assert not sel.any()


def test_clip_cov_backends_agree_on_keys():
    """The Triton key kernel and the torch path select the same tokens from the same random stream."""
    logp, old, adv, mask = _batch(5)
    a = clip_cov_mask(logp, old, adv, mask, **CFG, generator=torch.Generator().manual_seed(9), backend="torch")
    b = clip_cov_mask(logp, old, adv, mask, **CFG, generator=torch.Generator().manual_seed(9), backend="triton")
    assert torch.equal(a, b)


def test_clip_cov_uniform_over_candidates():
    """Chi-square goodness of fit: each candidate is chosen with probability k / #candidates."""
    logp, old, adv, mask = _batch(11)
    cfg = dict(CFG, clip_cov_ratio=0.01)
    cand, n_clip = clip_cov_candidates_ref(logp, old, adv, mask, **cfg)
    n_cand = int(cand.sum())
    assert n_clip < n_cand
    draws = 3000
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(B, L)
    for _ in range(draws):
        counts += clip_cov_mask(logp, old, adv, mask, **cfg, generator=g, backend="torch").float()
    obs = counts[cand]
    expected = draws * n_clip / n_cand
    chi2 = ((obs - expected) ** 2 / expected).sum().item()
    dof = n_cand - 1
    # upper 0.1 % point of chi2(dof) by the Wilson-Hilferty approximation (z = 3.09)
    crit = dof * (1 - 2 / (9 * dof) + 3.09 * math.sqrt(2 / (9 * dof))) ** 3
    assert chi2 < crit, (chi2, crit)
    assert counts[~cand].sum() == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ratio", [0.02, 0.25, 1e-6])
def test_kl_cov_matches_topk_oracle(backend, ratio):
    logp, _, adv, mask = _batch(2)
    sel = kl_cov_mask(logp, adv, mask, ratio, backend=backend)
    ref = kl_cov_selected_ref(logp, adv, mask, ratio)
    assert torch.equal(sel, ref)
    assert int(sel.sum()) == max(1, int(ratio * mask.sum().item()))
    assert not (sel & (mask == 0)).any()


def test_kl_cov_empty_mask():
    logp, _, adv, mask = _batch()
    assert not kl_cov_mask(logp, adv, torch.zeros_like(mask), 0.1).any()


def test_count_uses_python_rounding():
    """k = max(int(ratio * n_valid), 1) exactly as Python computes it, at a boundary where fp32 would differ."""
    n = 300
    mask = torch.ones(1, n)
    logp = torch.linspace(-3, 0, n).view(1, n)
    adv = torch.linspace(-1, 1, n).view(1, n)
    for ratio in (0.07, 0.1, 0.29, 1 / 3):
        assert int(kl_cov_mask(logp, adv, mask, ratio).sum()) == max(int(ratio * n), 1)
