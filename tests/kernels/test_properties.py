"""Property tests (hypothesis) of the torch paths against the oracles on random shapes and settings."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spear_kernels import AGG_MODES, linear_logprob_entropy, policy_loss
from spear_kernels.reference import linear_logprob_entropy_ref, policy_loss_ref


@settings(max_examples=25, deadline=None)
@given(
    b=st.integers(1, 5),
    length=st.integers(1, 40),
    mode=st.sampled_from(["vanilla", "clip_cov", "kl_cov", "gpg"]),
    agg=st.sampled_from(AGG_MODES),
    eps_lo=st.floats(0.0, 0.9),
    eps_hi=st.floats(0.0, 3.0),
    clip_c=st.floats(1.01, 20.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_policy_loss_property(b, length, mode, agg, eps_lo, eps_hi, clip_c, seed):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(b, length, generator=g) * 5
    old = logp + torch.randn(b, length, generator=g) * 2
    adv = torch.randn(b, length, generator=g) * 3
    mask = (torch.rand(b, length, generator=g) > 0.3).float()
    w = torch.rand(b, length, generator=g)
    sel = (torch.rand(b, length, generator=g) > 0.7) if mode in ("clip_cov", "kl_cov") else None
    lp = logp.clone().requires_grad_()
    out = policy_loss(lp, old, adv, mask, mode, agg, eps_lo, eps_hi, clip_c, weights=w, selected=sel, backend="torch")
    out.loss.backward()
    lr = logp.clone().requires_grad_()
    ref, _ = policy_loss_ref(lr, old, adv, mask, mode, agg, eps_lo, eps_hi, clip_c, weights=w, selected=sel)
    ref.backward()
    torch.testing.assert_close(out.loss, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lp.grad, lr.grad, atol=1e-5, rtol=1e-5)


@settings(max_examples=15, deadline=None)
@given(
    n=st.integers(1, 70),
    h=st.integers(1, 33),
    v=st.integers(2, 400),
    chunk=st.integers(1, 80),
    temperature=st.floats(0.3, 3.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_linear_chunked_cpu_path_property(n, h, v, chunk, temperature, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, generator=g)
    w = torch.randn(v, h, generator=g) * 0.5
    y = torch.randint(0, v, (n,), generator=g)
    gl, gh = torch.randn(n, generator=g), torch.randn(n, generator=g)
    xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
    lp, ent = linear_logprob_entropy(xs, ws, y, temperature=temperature, chunk_size=chunk, backend="torch")
    ((lp * gl).sum() + (ent * gh).sum()).backward()
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    lr, hr = linear_logprob_entropy_ref(xr, wr, y, None, temperature)
    ((lr * gl).sum() + (hr * gh).sum()).backward()
    torch.testing.assert_close(lp, lr, atol=5e-5, rtol=1e-5)
    torch.testing.assert_close(ent, hr, atol=5e-5, rtol=1e-5)
    torch.testing.assert_close(xs.grad, xr.grad, atol=5e-5, rtol=1e-4)
    torch.testing.assert_close(ws.grad, wr.grad, atol=5e-5, rtol=1e-4)
