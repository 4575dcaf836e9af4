"""The drop-in modules (spear_kernels.modules) against the plain-torch oracles: values and gradients.

They only wire inputs into the fused kernels, so what is tested here is the wiring: sequence-level
advantages, ``ignore_index`` labels, fully masked rows, SIL (replay-row) weighting, on-policy calls,
mixed dtypes and every loss mode, at odd sizes, in fp32 and bf16.
"""

import re
from pathlib import Path

import pytest
import torch
from conftest import BACKENDS, rel_err

from spear_kernels import FusedLinearPolicyLoss, LinearLogprobEntropy, PolicyLossOutput
from spear_kernels.reference import fused_linear_policy_loss_ref, linear_logprob_entropy_ref

MODES = ["vanilla", "clip_cov", "kl_cov", "gpg"]
B, L, H, V = 3, 29, 40, 301  # odd sizes: no dimension a multiple of a block
# (loss value, gradients): relative tolerances. bf16 on the CPU torch path rounds the logits to bf16 in
# the GEMM (as eager torch does); the oracle computes everything in fp32 from the same bf16 inputs.
TOL = {torch.float32: (2e-5, 2e-4), torch.bfloat16: (5e-3, 2e-2)}
LP_TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}
SEL_KW = dict(clip_cov_ratio=0.05, clip_cov_lb=-50.0, clip_cov_ub=50.0, kl_cov_ratio=0.05)  # non-empty selections


def _batch(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, H, generator=g).to(dtype)
    w = (torch.randn(V, H, generator=g) * 0.3).to(dtype)
    bias = (torch.randn(V, generator=g) * 0.1).to(dtype)
    y = torch.randint(0, V, (B, L), generator=g)
    y[0, -5:] = -100  # ignore_index tail (HF prompt / padding convention)
    mask = (torch.rand(B, L, generator=g) > 0.2).float()
    mask[1] = 0  # a fully masked row
    adv = torch.randn(B, generator=g)  # one advantage per sequence (GRPO)
    lp, _ = linear_logprob_entropy_ref(x.reshape(-1, H), w, y.reshape(-1), bias)
    old = lp.view(B, L) + 0.3 * torch.randn(B, L, generator=g)  # off-policy: ratios on both sides of the clip
    wts = torch.rand(B, L, generator=g) + 0.5
    return x, w, bias, y, mask, adv, old, wts


def _reference(x, w, bias, y, mask, adv, old, mode, temperature, entropy_coeff, weights, entropy_weights, selected,
               **kw):  # fmt: skip
    """The oracle with the module's input conventions spelt out by hand."""
    m = mask * (y != -100).float()
    xr, wr, br = (t.clone().requires_grad_() for t in (x, w, bias))
    loss, lp, ent = fused_linear_policy_loss_ref(
        xr, wr, y, old, adv[:, None].expand(B, L), m, bias=br, temperature=temperature, entropy_coeff=entropy_coeff,
        entropy_weights=entropy_weights, loss_mode=mode, weights=weights, selected=selected, **kw,
    )  # fmt: skip
    loss.backward()
    return loss, lp, ent, (xr.grad, wr.grad, br.grad)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_linear_policy_loss_module_matches_oracle(mode, dtype):
    """Every loss mode with SIL weighting: replay row 2 scaled by c(t) = 0.35, IS weights, entropy bonus."""
    x, w, bias, y, mask, adv, old, wts = _batch(dtype)
    replay, c = torch.tensor([False, False, True]), 0.35
    kw = dict(loss_agg_mode="seq-mean-token-mean", clip_ratio_low=0.2, clip_ratio_high=0.28, ppo_kl_coef=0.5)
    module = FusedLinearPolicyLoss(mode, temperature=0.8, entropy_coeff=0.01, chunk_size=31, backend="torch",
                                   **kw, **SEL_KW)  # fmt: skip
    xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, bias))
    out = module(xs, ws, y, adv, old, mask, bs, weights=wts, replay_mask=replay, replay_coef=c,
                 generator=torch.Generator().manual_seed(0))  # fmt: skip
    (3.0 * out.loss).backward()  # a non-unit upstream gradient
    assert isinstance(out, PolicyLossOutput)
    if mode in ("clip_cov", "kl_cov"):
        assert out.selected is not None and out.selected.any()
        assert not (out.selected & (mask * (y != -100) == 0)).any()  # only valid tokens are selected
    sil = torch.where(replay, c, 1.0)[:, None].expand(B, L)
    ref, lp, ent, grads = _reference(x, w, bias, y, mask, adv, old, mode, 0.8, 0.01, wts * sil, sil, out.selected,
                                     **kw)  # fmt: skip
    vt, gt = TOL[dtype]
    assert abs(out.loss.item() - ref.item()) <= vt * max(1.0, abs(ref.item()))
    for got, want in zip((xs.grad, ws.grad, bs.grad), grads):
        assert got.dtype == dtype and torch.isfinite(got).all()
        assert rel_err(got, 3.0 * want) < gt
    assert xs.grad[1].abs().max() == 0 and xs.grad[0, -5:].abs().max() == 0  # masked rows / ignored labels
    valid = y != -100
    assert out.logp.shape == (B, L) and out.entropy.shape == (B, L) and out.logp.dtype == torch.float32
    assert (out.logp[valid] - lp[valid]).abs().max() < LP_TOL[dtype]
    assert (out.entropy - ent).abs().max() < LP_TOL[dtype]
    if mode == "vanilla" and dtype == torch.float32:  # verl's clip fractions, from the oracle's log-probs
        m = mask * valid.float()
        a = adv[:, None].expand(B, L)
        r = torch.exp(torch.clamp(lp - old, -20, 20))
        l1, l2 = -a * r, -a * r.clamp(0.8, 1.28)
        den = m.sum() + 1e-8
        torch.testing.assert_close(out.pg_clipfrac, ((l2 > l1).float() * m).sum() / den)
        torch.testing.assert_close(out.pg_clipfrac_lower,
                                   (((torch.maximum(l1, l2) > -a * 3.0) & (a < 0)).float() * m).sum() / den)
        torch.testing.assert_close(out.ppo_kl, (-(lp - old) * m).sum() / den)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["vanilla", "clip_cov"])
def test_fused_linear_policy_loss_module_backends(backend, mode):
    """The same through the Triton kernels (interpreter on CPU), token-level advantages, no bias."""
    x, w, _, y, mask, adv, old, wts = _batch(torch.float32, seed=1)
    adv_tok = adv[:, None] + 0.1 * torch.randn(B, L)
    module = FusedLinearPolicyLoss(mode, clip_ratio_high=0.28, entropy_coeff=0.005, backend=backend, **SEL_KW)
    xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
    out = module(xs, ws, y, adv_tok, old, mask, weights=wts, generator=torch.Generator().manual_seed(1))
    out.loss.backward()
    m = mask * (y != -100).float()
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    ref, _, _ = fused_linear_policy_loss_ref(xr, wr, y, old, adv_tok, m, entropy_coeff=0.005, loss_mode=mode,
                                             clip_ratio_high=0.28, weights=wts, selected=out.selected)  # fmt: skip
    ref.backward()
    vt, gt = TOL[torch.float32]
    assert abs(out.loss.item() - ref.item()) <= vt * max(1.0, abs(ref.item()))
    assert rel_err(xs.grad, xr.grad) < gt and rel_err(ws.grad, wr.grad) < gt


@pytest.mark.parametrize("mode", MODES)
def test_fused_linear_policy_loss_module_on_policy(mode):
    """``old_logp=None`` (exactly on-policy): the loss of passing this pass's own log-probs."""
    x, w, bias, y, mask, adv, _, _ = _batch(torch.float32, seed=2)
    module = FusedLinearPolicyLoss(mode, entropy_coeff=0.01, backend="torch", **SEL_KW)
    xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, bias))
    out = module(xs, ws, y, adv, None, mask, bs, generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    lp, _ = linear_logprob_entropy_ref(x.reshape(-1, H), w, y.reshape(-1), bias)
    ref, _, _, grads = _reference(x, w, bias, y, mask, adv, lp.view(B, L).detach(), mode, 1.0, 0.01, None, None,
                                  out.selected)  # fmt: skip
    assert abs(out.loss.item() - ref.item()) <= 2e-5 * max(1.0, abs(ref.item()))
    for got, want in zip((xs.grad, ws.grad, bs.grad), grads):
        assert rel_err(got, want) < 2e-4
    if mode == "vanilla":
        assert float(out.pg_clipfrac) == 0.0  # every ratio is 1


def test_module_casts_weight_to_hidden_dtype():
    """bf16 hidden states with an fp32 master lm_head (mixed precision): the weight's gradient reaches the
    fp32 parameter through the cast, and equals the gradient of the bf16 copy."""
    x, w, _, y, mask, adv, old, _ = _batch(torch.bfloat16, seed=3)
    w32 = w.float().requires_grad_()
    xs = x.clone().requires_grad_()
    out = FusedLinearPolicyLoss(backend="torch")(xs, w32, y, adv, old, mask)
    out.loss.backward()
    assert w32.grad.dtype == torch.float32 and xs.grad.dtype == torch.bfloat16
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    ref, _, _ = fused_linear_policy_loss_ref(xr, wr, y, old, adv[:, None].expand(B, L), mask * (y != -100))
    ref.backward()
    assert rel_err(w32.grad, wr.grad) < TOL[torch.bfloat16][1] and rel_err(xs.grad, xr.grad) < TOL[torch.bfloat16][1]


def test_module_rejects_bad_configuration_and_shapes():
    with pytest.raises(ValueError, match="loss_mode"):
        FusedLinearPolicyLoss("ppo")
    with pytest.raises(ValueError, match="loss_agg_mode"):
        FusedLinearPolicyLoss(loss_agg_mode="mean")
    with pytest.raises(ValueError, match="clip_ratio_c"):
        FusedLinearPolicyLoss(clip_ratio_c=1.0)
    with pytest.raises(ValueError, match="backward_mode"):
        FusedLinearPolicyLoss(backward_mode="later")
    x, w, _, y, mask, adv, old, _ = _batch(torch.float32)
    module = FusedLinearPolicyLoss()
    with pytest.raises(ValueError, match="advantages"):
        module(x, w, y, torch.zeros(B + 1), old, mask)
    with pytest.raises(ValueError, match="hidden"):
        module(x[:, :-1], w, y, adv, old, mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_logprob_entropy_module_matches_oracle(dtype):
    x, w, bias, y, _, _, _, _ = _batch(dtype, seed=4)
    xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, bias))
    lp, ent = LinearLogprobEntropy(temperature=0.7, chunk_size=17, backend="torch")(xs, ws, y, bs)
    g1, g2 = torch.randn(B, L), torch.randn(B, L)  # arbitrary upstream gradients for both outputs
    ((lp * g1).sum() + (ent * g2).sum()).backward()
    xr, wr, br = (t.clone().requires_grad_() for t in (x, w, bias))
    rl, re = linear_logprob_entropy_ref(xr.reshape(-1, H), wr, y.reshape(-1), br, 0.7)
    rl, re = rl.view(B, L), re.view(B, L)
    ((rl * g1).sum() + (re * g2).sum()).backward()
    assert lp.dtype == torch.float32 and lp.shape == (B, L)
    assert (lp[y == -100] == 0).all()  # ignored labels: log-prob 0
    assert (lp - rl).abs().max() < LP_TOL[dtype] and (ent - re).abs().max() < LP_TOL[dtype]
    for got, want in ((xs, xr), (ws, wr), (bs, br)):
        assert got.grad.dtype == dtype and rel_err(got.grad, want.grad) < TOL[dtype][1]


def test_readme_example_runs():
    """The first example of kernels/README.md runs as written."""
    readme = (Path(__file__).resolve().parents[2] / "kernels" / "README.md").read_text()
    code = re.findall(r"```python\n(.*?)```", readme, re.S)[0]
    namespace: dict = {}
    exec(compile(code, "kernels/README.md", "exec"), namespace)
    assert torch.isfinite(namespace["out"].loss) and namespace["lm_head"].grad is not None
