import pytest
import torch
from conftest import BACKENDS, rel_err

from spear_kernels import AGG_MODES, agg_loss, agg_scale, fused_linear_policy_loss, policy_loss
from spear_kernels.reference import (
    fused_linear_policy_loss_ref,
    linear_logprob_entropy_ref,
    policy_loss_ref,
)

MODES = ["vanilla", "clip_cov", "kl_cov", "gpg"]
B, L = 4, 37


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, L, generator=g) * 3
    old = logp + torch.randn(B, L, generator=g) * 0.4
    old[0, :3] = logp[0, :3] + torch.tensor([30.0, -30.0, 25.0])  # |δ| > 20: vanilla's clamp
    adv = torch.randn(B, L, generator=g)
    mask = (torch.rand(B, L, generator=g) > 0.25).float()
    mask[2] = 0  # fully masked row
    w = torch.rand(B, L, generator=g) + 0.5
    return logp, old, adv, mask, w


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("agg", AGG_MODES)
def test_policy_loss_matches_oracle(backend, mode, agg):
    logp, old, adv, mask, w = _batch()
    sel = (torch.rand(B, L) > 0.8) & (mask > 0) if mode in ("clip_cov", "kl_cov") else None
    lp = logp.clone().requires_grad_()
    out = policy_loss(lp, old, adv, mask, mode, agg, 0.2, 0.28, 3.0, weights=w, selected=sel, ppo_kl_coef=0.5,
                      backend=backend)
    out.loss.backward()
    lr = logp.clone().requires_grad_()
    ref, _ = policy_loss_ref(lr, old, adv, mask, mode, agg, 0.2, 0.28, 3.0, weights=w, selected=sel,
                             ppo_kl_coef=0.5)
    ref.backward()
    torch.testing.assert_close(out.loss, ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lp.grad, lr.grad, atol=1e-6, rtol=1e-5)
    assert torch.isfinite(lp.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_metrics_match_verl_definitions(backend):
    logp, old, adv, mask, _ = _batch(1)
    mask = mask.clone()
    mask[0, :3] = 1  # the tokens whose log-ratio is beyond verl's +-20 clamp count in ppo_kl
    out = policy_loss(logp, old, adv, mask, "vanilla", clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0,
                      backend=backend)
    d = torch.clamp(logp - old, -20, 20)
    r = d.exp()
    l1, l2 = -adv * r, -adv * r.clamp(0.8, 1.28)
    lc = torch.maximum(l1, l2)
    den = mask.sum() + 1e-8
    torch.testing.assert_close(out.pg_clipfrac, ((l2 > l1).float() * mask).sum() / den)
    torch.testing.assert_close(out.pg_clipfrac_lower, (((lc > -adv * 3) & (adv < 0)).float() * mask).sum() / den)
    torch.testing.assert_close(out.ppo_kl, (-d * mask).sum() / den)  # the clamped log-ratio, as verl


@pytest.mark.parametrize("mode", ["clip_cov", "kl_cov"])
def test_policy_loss_builds_selection(mode):
    logp, old, adv, mask, _ = _batch(2)
    out = policy_loss(logp.requires_grad_(), old, adv, mask, mode, clip_cov_ratio=0.05, clip_cov_lb=-5,
                      clip_cov_ub=5, kl_cov_ratio=0.05, generator=torch.Generator().manual_seed(0))
    assert out.selected is not None and out.selected.any()
    ref, _ = policy_loss_ref(logp, old, adv, mask, mode, selected=out.selected)
    torch.testing.assert_close(out.loss, ref)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy overflows on purpose here
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_garbage_on_masked_tokens_never_gives_nan(backend, mode):
    """Padding with overflowing ratios (e^100) and A = 0 must not leak NaN into the loss or gradient."""
    logp, old, adv, mask, _ = _batch(3)
    old = torch.where(mask > 0, old, torch.full_like(old, -100.0))
    logp = torch.where(mask > 0, logp, torch.zeros_like(logp))
    adv = torch.where(mask > 0, adv, torch.zeros_like(adv))
    sel = torch.zeros_like(mask, dtype=torch.bool) if mode in ("clip_cov", "kl_cov") else None
    lp = logp.clone().requires_grad_()
    out = policy_loss(lp, old, adv, mask, mode, selected=sel, backend=backend)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(lp.grad).all()
    assert (lp.grad[mask == 0] == 0).all()
    assert torch.isfinite(out.ppo_kl) and torch.isfinite(out.pg_clipfrac)


def test_agg_scale_reproduces_agg_loss():
    _, _, _, mask, _ = _batch()
    x = torch.randn(B, L)
    for mode in AGG_MODES:
        for info in ({}, {"dp_size": 2, "batch_num_tokens": 90, "global_batch_size": 7, "loss_scale_factor": 50}):
            torch.testing.assert_close((agg_scale(mask, mode, **info) * x).sum(), agg_loss(x, mask, mode, **info))
    torch.testing.assert_close((agg_scale(mask, "token-mean", batch_num_tokens=1000.0) * x).sum(),
                               (x * mask).sum() / 1000.0)
    with pytest.warns(DeprecationWarning):  # the old names of batch_num_tokens / loss_scale_factor
        old_names = agg_scale(mask, "seq-mean-token-sum-norm", denominator=1000.0, norm_length=9.0)
    torch.testing.assert_close(old_names, agg_scale(mask, "seq-mean-token-sum-norm", loss_scale_factor=9.0))


def test_dual_clip_requires_c_above_one():
    logp, old, adv, mask, _ = _batch()
    with pytest.raises(ValueError):
        policy_loss(logp, old, adv, mask, clip_ratio_c=1.0)


# ------------------------------------------------------------------ the fully fused path
TOL = {torch.float32: (2e-5, 2e-4), torch.bfloat16: (5e-3, 3e-2)}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_linear_policy_loss_matches_oracle(backend, mode, dtype):
    g = torch.Generator().manual_seed(3)
    h, v = 24, 333
    x = torch.randn(B, L, h, generator=g).to(dtype)
    w = (torch.randn(v, h, generator=g) * 0.3).to(dtype)
    y = torch.randint(0, v, (B, L), generator=g)
    _, old, adv, mask, wts = _batch(4)
    old = old - 5.0  # around log(1/V)
    kw = dict(temperature=0.8, loss_mode=mode, loss_agg_mode="token-mean", clip_ratio_low=0.2, clip_ratio_high=0.28,
              weights=wts, ppo_kl_coef=0.5)
    xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
    out = fused_linear_policy_loss(xs, ws, y, old, adv, mask, entropy_coeff=0.01, clip_cov_ratio=0.05,
                                   clip_cov_lb=-50, clip_cov_ub=50, kl_cov_ratio=0.05,
                                   generator=torch.Generator().manual_seed(0), chunk_size=40, backend=backend, **kw)
    out.loss.backward()
    if mode in ("clip_cov", "kl_cov"):
        assert out.selected is not None and out.selected.any()
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    ref, _lpr, _hr = fused_linear_policy_loss_ref(xr, wr, y, old, adv, mask, entropy_coeff=0.01, selected=out.selected,
                                                **kw)
    ref.backward()
    vt, gt = TOL[dtype] if not (dtype == torch.bfloat16 and backend == "torch") else (5e-2, 5e-2)
    assert abs(out.loss.item() - ref.item()) < vt * max(1.0, abs(ref.item()))
    assert rel_err(xs.grad, xr.grad) < gt
    assert rel_err(ws.grad, wr.grad) < gt
    assert xs.grad.dtype == dtype and ws.grad.dtype == dtype
    assert out.logp.shape == (B, L) and torch.isfinite(out.logp).all()


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("backward_mode", ["in_forward", "recompute"])
def test_fused_linear_policy_loss_aggregations(agg, backward_mode):
    g = torch.Generator().manual_seed(5)
    h, v = 16, 211
    x = torch.randn(B, L, h, generator=g)
    w = torch.randn(v, h, generator=g) * 0.3
    bias = torch.randn(v, generator=g)
    y = torch.randint(0, v, (B, L), generator=g)
    _, old, adv, mask, wts = _batch(6)
    xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, bias))
    out = fused_linear_policy_loss(xs, ws, y, old - 5, adv, mask, bias=bs, loss_agg_mode=agg, weights=wts,
                                   entropy_coeff=0.003, entropy_weights=wts, chunk_size=50,
                                   backward_mode=backward_mode, backend="torch")
    (2.0 * out.loss).backward()  # a non-unit upstream gradient
    xr, wr, br = (t.clone().requires_grad_() for t in (x, w, bias))
    ref, _, _ = fused_linear_policy_loss_ref(xr, wr, y, old - 5, adv, mask, bias=br, loss_agg_mode=agg,
                                             weights=wts, entropy_coeff=0.003, entropy_weights=wts)
    (2.0 * ref).backward()
    torch.testing.assert_close(out.loss, ref, atol=1e-5, rtol=1e-5)
    for a, r in ((xs, xr), (ws, wr), (bs, br)):
        assert rel_err(a.grad, r.grad) < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_fused_loss_without_old_logp_is_the_on_policy_loss(backend, mode):
    """``old_logp=None``: the same loss, gradients and selection as passing the pass's own log-probs."""
    g = torch.Generator().manual_seed(8)
    h, v = 20, 157
    x = torch.randn(B, L, h, generator=g)
    w = torch.randn(v, h, generator=g) * 0.3
    y = torch.randint(0, v, (B, L), generator=g)
    _, _, adv, mask, wts = _batch(9)
    kw = dict(loss_mode=mode, weights=wts, entropy_coeff=0.01, clip_cov_ratio=0.05, clip_cov_lb=-50,
              clip_cov_ub=50, kl_cov_ratio=0.05, chunk_size=30, backend=backend)
    old, _ = linear_logprob_entropy_ref(x.reshape(-1, h), w, y.reshape(-1))
    results = []
    for _ in range(2):  # first without old log-probs, then with that pass's own (bit for bit: ratio 1 exactly)
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        old_logp = results[0][0].logp if results else None
        out = fused_linear_policy_loss(xs, ws, y, old_logp, adv, mask, generator=torch.Generator().manual_seed(0), **kw)
        out.loss.backward()
        results.append((out, xs.grad, ws.grad))
    (own, ox, ow), (given, gx, gw) = results
    torch.testing.assert_close(own.loss, given.loss, atol=1e-5, rtol=1e-5)
    assert rel_err(ox, gx) < 1e-4 and rel_err(ow, gw) < 1e-4
    torch.testing.assert_close(own.logp, old.view(B, L), atol=1e-5, rtol=1e-5)
    if mode == "vanilla":
        assert float(own.pg_clipfrac) == 0.0 and abs(float(own.ppo_kl)) < 1e-6  # every ratio is 1
    if mode in ("clip_cov", "kl_cov"):
        assert torch.equal(own.selected, given.selected)
