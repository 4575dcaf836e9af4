"""Every kernel, several seeds and shapes whose N, H and V are multiples of no block or chunk size,
with the NaN poison on (tests/conftest.py sets ``SPEAR_KERNELS_POISON=1``): a kernel that reads memory
nobody wrote, or leaves part of an output unwritten, fails here on every run and every machine.

Values and gradients are compared with the plain-torch oracles of ``spear_kernels.reference``.
"""

import importlib

import pytest
import torch
from conftest import BACKENDS, rel_err

from spear_kernels import (
    clip_cov_mask,
    fused_linear_policy_loss,
    kl_cov_mask,
    linear_logprob_entropy,
    linear_logprob_entropy_stats,
    linear_logprob_entropy_with_grad,
    logprob_entropy,
    policy_loss,
)
from spear_kernels.reference import (
    clip_cov_candidates_ref,
    fused_linear_policy_loss_ref,
    kl_cov_selected_ref,
    linear_logprob_entropy_ref,
    logprob_entropy_ref,
    policy_loss_ref,
)
from spear_kernels.utils import POISON_ENV, check_written, poisoning, scratch

lle = importlib.import_module("spear_kernels.linear_logprob_entropy")

CASES = [  # (seed, N, H, V): odd sizes, one token, one token past a block, a vocabulary just past 2^k
    (11, 1, 5, 257),
    (12, 37, 29, 1031),
    (13, 131, 40, 515),
    (14, 67, 33, 2053),
]
DTYPES = [torch.float32, torch.bfloat16]
# (value abs tol, grad rel tol); the torch CPU path rounds bf16 logits as torch eager does.
TOL = {
    ("torch", torch.float32): (5e-5, 1e-4),
    ("triton", torch.float32): (5e-5, 1e-4),
    ("torch", torch.bfloat16): (8e-2, 4e-2),
    ("triton", torch.bfloat16): (1e-4, 3e-2),
}


def _name(backend) -> str:
    return backend if isinstance(backend, str) else backend.values[0]


def _data(seed, n, h, v, dtype):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, generator=g).to(dtype)
    w = (torch.randn(v, h, generator=g) * 0.4).to(dtype)
    b = torch.randn(v, generator=g).to(dtype)
    y = torch.randint(0, v, (n,), generator=g)
    y[torch.rand(n, generator=g) < 0.2] = -100  # masked tokens
    gl, gh = torch.randn(n, generator=g), torch.randn(n, generator=g)
    return x, w, b, y, gl, gh


def _oracle(x, w, b, y, t, gl, gh):
    xr, wr, br = (u.clone().requires_grad_() for u in (x, w, b))
    lr, hr = linear_logprob_entropy_ref(xr, wr, y, br, t)
    ((lr * gl).sum() + (hr * gh).sum()).backward()
    return lr, hr, xr.grad, wr.grad, br.grad


@pytest.fixture
def small_workspace(monkeypatch):
    """A dZ workspace of one 256-column tile: the recompute backward walks many vocabulary slices, the
    last one narrower than the others."""
    monkeypatch.setattr(lle, "RECOMPUTE_WORKSPACE_BYTES", 1)


def test_the_suite_runs_poisoned():
    assert poisoning(), f"tests/conftest.py sets {POISON_ENV}=1; this sweep is meaningless without it"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_logprob_entropy_from_logits(backend, dtype, case):
    seed, n, _h, v = case
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, v, generator=g) * 3).to(dtype)
    y = torch.randint(0, v, (n,), generator=g)
    y[0] = -100
    gl, gh = torch.randn(n, generator=g), torch.randn(n, generator=g)
    z = logits.clone().requires_grad_()
    lp, ent = logprob_entropy(z, y, 0.7, backend=_name(backend))
    ((lp * gl).sum() + (ent * gh).sum()).backward()
    zr = logits.clone().requires_grad_()
    lr, hr = logprob_entropy_ref(zr, y, 0.7)
    ((lr * gl).sum() + (hr * gh).sum()).backward()
    torch.testing.assert_close(lp, lr, atol=2e-5, rtol=1e-5)
    # entropy = lse - sum(p * z/T): two terms of the logits' size cancel, and both sides round their fp32
    # reductions by the CPU's vector width (AVX2 vs AVX-512 differ), so the tolerance follows max |z/T|
    scale = float(logits.float().abs().max()) / 0.7
    torch.testing.assert_close(ent, hr, atol=max(2e-5, 4e-6 * scale), rtol=1e-5)
    assert torch.isfinite(z.grad).all()
    assert rel_err(z.grad, zr.grad) < (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_linear_logprob_entropy_autograd(backend, dtype, case, small_workspace):
    seed, n, h, v = case
    x, w, b, y, gl, gh = _data(seed, n, h, v, dtype)
    xs, ws, bs = (u.clone().requires_grad_() for u in (x, w, b))
    lp, ent = linear_logprob_entropy(xs, ws, y, bs, 0.9, chunk_size=max(1, n // 3), backend=_name(backend))
    ((lp * gl).sum() + (ent * gh).sum()).backward()
    lr, hr, gx, gw, gb = _oracle(x, w, b, y, 0.9, gl, gh)
    vt, gt = TOL[(_name(backend), dtype)]
    assert (lp - lr).abs().max().item() < vt and (ent - hr).abs().max().item() < vt
    for got in (xs.grad, ws.grad, bs.grad):
        assert torch.isfinite(got.float()).all()
    assert rel_err(xs.grad, gx) < gt and rel_err(ws.grad, gw) < gt and rel_err(bs.grad, gb) < gt


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["in_forward", "recompute"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_linear_logprob_entropy_with_grad(backend, mode, dtype, case, small_workspace):
    seed, n, h, v = case
    x, w, b, y, gl, gh = _data(seed, n, h, v, dtype)
    lp, ent, dx, dw, db = linear_logprob_entropy_with_grad(
        x, w, y, lambda i, j, *_: (gl[i:j], gh[i:j]), b, 1.3, chunk_size=max(1, n // 2 + 1),
        backend=_name(backend), mode=mode,
    )
    lr, hr, gx, gw, gb = _oracle(x, w, b, y, 1.3, gl, gh)
    vt, gt = TOL[(_name(backend), dtype)]
    assert (lp - lr).abs().max().item() < vt and (ent - hr).abs().max().item() < vt
    for got in (dx, dw, db):
        assert torch.isfinite(got.float()).all()
    assert rel_err(dx, gx) < gt and rel_err(dw, gw) < gt and rel_err(db, gb) < gt
    stats = linear_logprob_entropy_stats(x, w, y, b, 1.3, backend=_name(backend))
    torch.testing.assert_close(stats[0], lp, atol=vt, rtol=0)
    torch.testing.assert_close(stats[1], ent, atol=vt, rtol=0)


def _loss_batch(seed, n):
    """[2, n] rows (the second row fully masked) of log-probs, old log-probs, advantages, mask, weights."""
    g = torch.Generator().manual_seed(seed)
    shape = (2, n)
    logp = -torch.rand(shape, generator=g) * 3 - 4
    old = logp + torch.randn(shape, generator=g) * 0.3
    adv = torch.randn(shape, generator=g)
    mask = (torch.rand(shape, generator=g) > 0.25).float()
    mask[0, 0] = 1.0
    mask[1] = 0.0
    wts = torch.rand(shape, generator=g) + 0.5
    return logp, old, adv, mask, wts


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["vanilla", "clip_cov", "kl_cov", "gpg"])
@pytest.mark.parametrize("case", CASES)
def test_policy_loss_and_cov_masks(backend, mode, case):
    seed, n, _h, _v = case
    logp, old, adv, mask, wts = _loss_batch(seed, n)
    be = _name(backend)
    sel = None
    if mode == "clip_cov":
        cfg = dict(clip_ratio_low=0.2, clip_ratio_high=0.28, clip_cov_ratio=0.3, clip_cov_lb=-5.0, clip_cov_ub=5.0)
        sel = clip_cov_mask(logp, old, adv, mask, **cfg, generator=torch.Generator().manual_seed(seed), backend=be)
        cand, n_clip = clip_cov_candidates_ref(logp, old, adv, mask, **cfg)
        assert int(sel.sum()) == min(n_clip, int(cand.sum())) and not (sel & ~cand).any()
    elif mode == "kl_cov":
        sel = kl_cov_mask(logp, adv, mask, kl_cov_ratio=0.3, backend=be)
        assert torch.equal(sel, kl_cov_selected_ref(logp, adv, mask, 0.3))
    lp = logp.clone().requires_grad_()
    out = policy_loss(lp, old, adv, mask, mode, "seq-mean-token-mean", 0.2, 0.28, 3.0, weights=wts, selected=sel,
                      ppo_kl_coef=0.5, backend=be)
    out.loss.backward()
    lr = logp.clone().requires_grad_()
    ref, _ = policy_loss_ref(lr, old, adv, mask, mode, "seq-mean-token-mean", 0.2, 0.28, 3.0, weights=wts,
                             selected=sel, ppo_kl_coef=0.5)
    ref.backward()
    torch.testing.assert_close(out.loss, ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lp.grad, lr.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("backward_mode", ["in_forward", "recompute"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES[1:])
def test_fused_linear_policy_loss(backend, backward_mode, dtype, case, small_workspace):
    seed, n, h, v = case
    x, w, b, y, _gl, _gh = _data(seed, 2 * n, h, v, dtype)
    x, y = x.view(2, n, h), y.view(2, n)
    _, old, adv, mask, wts = _loss_batch(seed, n)
    mask = mask * (y >= 0)
    kw = dict(temperature=0.8, loss_mode="vanilla", loss_agg_mode="token-mean", clip_ratio_low=0.2,
              clip_ratio_high=0.28, weights=wts, entropy_coeff=0.01, ppo_kl_coef=0.5)
    xs, ws, bs = (u.clone().requires_grad_() for u in (x, w, b))
    out = fused_linear_policy_loss(xs, ws, y, old, adv, mask, bias=bs, chunk_size=max(1, n // 2 + 1),
                                   backward_mode=backward_mode, backend=_name(backend), **kw)
    out.loss.backward()
    xr, wr, br = (u.clone().requires_grad_() for u in (x, w, b))
    ref, _, _ = fused_linear_policy_loss_ref(xr, wr, y, old, adv, mask, bias=br, **kw)
    ref.backward()
    vt, gt = (2e-5, 2e-4) if dtype == torch.float32 else (5e-2, 5e-2)
    assert abs(out.loss.item() - ref.item()) < vt * max(1.0, abs(ref.item()))
    for got, want in ((xs.grad, xr.grad), (ws.grad, wr.grad), (bs.grad, br.grad)):
        assert torch.isfinite(got.float()).all()
        assert rel_err(got, want) < gt


def test_poisoned_scratch_starts_as_the_nan_pattern_and_unwritten_outputs_fail():
    for dtype in [*DTYPES, torch.float16]:
        buf = scratch(3, 5, dtype=dtype)
        assert torch.isnan(buf.float()).all()
        with pytest.raises(RuntimeError, match="15 of 15 elements of 'buf'"):
            check_written("probe", buf=buf)
        buf[:, :4] = 0
        with pytest.raises(RuntimeError, match="3 of 15"):
            check_written("probe", buf=buf)
        buf.fill_(float("nan"))  # a NaN the arithmetic produced is not the poison pattern
        check_written("probe", buf=buf)
    assert (scratch(4, dtype=torch.int8) == torch.iinfo(torch.int8).min).all()

