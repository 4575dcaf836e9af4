"""The verl-style functions give the same results through the fused kernels as through the torch path.

``SPEAR_KERNELS_BACKEND`` picks the path: ``torch`` the torch path, ``triton`` the kernel path (on these
CPU tensors: the Triton kernels under ``TRITON_INTERPRET=1``, which tests/conftest.py sets); the
deprecated ``SPEAR_LOSS_BACKEND=kernels`` the kernel path with the kernels' own (chunked torch) backend.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import spear_kernels
from spear_engine.algorithms import losses, token_ops
from spear_engine.algorithms.kernel_dispatch import BACKEND_ENV, LEGACY_LOSS_BACKEND_ENV, use_kernels

KERNELS = "triton"

AGG_MODES = ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-sum-norm", "seq-mean-token-mean"]


def config(**policy_loss) -> SimpleNamespace:
    section = SimpleNamespace(clip_cov_ratio=0.05, clip_cov_lb=1.0, clip_cov_ub=5.0, kl_cov_ratio=0.1,
                              ppo_kl_coef=0.3, **policy_loss)  # fmt: skip
    return SimpleNamespace(clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0,
                           policy_loss=section, global_batch_info={})  # fmt: skip


def inputs(seed: int, b: int = 5, t: int = 7):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(b, t, generator=g) > 0.25).float()
    mask[1] = 0.0  # a fully masked row
    old = -torch.rand(b, t, generator=g) * 3
    logp = (old + 0.4 * torch.randn(b, t, generator=g)).requires_grad_()
    adv = torch.randn(b, 1, generator=g).expand(b, t).contiguous() * mask
    return old, logp, adv, mask


def run(mode: str, agg: str, backend: str, monkeypatch, info=None, weights=None, seed=0):
    monkeypatch.setenv(BACKEND_ENV, backend)
    old, logp, adv, mask = inputs(seed)
    cfg = config()
    cfg.global_batch_info = info or {}
    loss, metrics = losses.get_policy_loss_fn(mode)(old, logp, adv, mask, agg, cfg, weights)
    loss.backward()
    return loss.detach(), logp.grad, metrics


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("mode", ["vanilla", "kl_cov", "gpg"])
def test_kernel_path_matches_torch_path(mode: str, agg: str, monkeypatch) -> None:
    weights = torch.rand(5, 7, generator=torch.Generator().manual_seed(9)) + 0.5
    for info in ({}, {"global_batch_size": 3, "batch_num_tokens": 11, "dp_size": 2}, {"loss_scale_factor": 4.0}):
        a = run(mode, agg, "torch", monkeypatch, info, weights)
        b = run(mode, agg, KERNELS, monkeypatch, info, weights)
        torch.testing.assert_close(b[0], a[0], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(b[1], a[1], rtol=1e-5, atol=1e-7)
        assert b[2].keys() == a[2].keys()
        for key in a[2]:
            assert b[2][key] == pytest.approx(a[2][key], rel=1e-5, abs=1e-7)


def test_clip_cov_without_candidates_matches_and_with_candidates_drops_the_budget(monkeypatch) -> None:
    for lb, ub in ((100.0, 200.0), (-1e9, 1e9)):
        results = {}
        for backend in ("torch", KERNELS):
            monkeypatch.setenv(BACKEND_ENV, backend)
            old, logp, adv, mask = inputs(3)
            cfg = config()
            cfg.policy_loss.clip_cov_lb, cfg.policy_loss.clip_cov_ub = lb, ub
            loss, metrics = losses.compute_policy_loss_clip_cov(old, logp, adv, mask, "token-mean", cfg)
            results[backend] = (loss.detach(), metrics)
        if lb > 0:  # no candidate: plain PPO clip on both paths
            torch.testing.assert_close(results[KERNELS][0], results["torch"][0], rtol=1e-6, atol=1e-7)
        # both detach exactly max(floor(0.05 * n_valid), 1) tokens when candidates exist, none otherwise
        n_valid = float(mask.sum())
        expected = 0.0 if lb > 0 else max(int(0.05 * n_valid), 1) / n_valid
        for backend in results:
            assert results[backend][1]["actor/pg_clipfrac"] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("agg", AGG_MODES)
def test_agg_scale_reproduces_agg_loss(agg: str) -> None:
    _, _, _, mask = inputs(4)
    values = torch.randn(mask.shape)
    for info in ({}, {"global_batch_size": 2, "batch_num_tokens": 9, "dp_size": 3, "loss_scale_factor": 5.0}):
        expected = losses.agg_loss(values, mask, agg, **info)
        torch.testing.assert_close((spear_kernels.agg_scale(mask, agg, **info) * values).sum(), expected)


def test_one_backend_switch(monkeypatch) -> None:
    """The loss functions follow the kernels' switch: Triton tensors take the kernel path, none other."""
    cpu = torch.zeros(2)
    monkeypatch.delenv(LEGACY_LOSS_BACKEND_ENV, raising=False)
    for choice, expected in (("auto", False), ("torch", False), ("triton", True)):
        monkeypatch.setenv(BACKEND_ENV, choice)
        assert use_kernels(cpu) is expected
    monkeypatch.setenv(BACKEND_ENV, "cuda")
    with pytest.raises(ValueError):
        use_kernels(cpu)


@pytest.mark.parametrize("mode", ["vanilla", "gpg"])
def test_deprecated_loss_backend_still_works(mode: str, monkeypatch) -> None:
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    monkeypatch.setenv(LEGACY_LOSS_BACKEND_ENV, "torch")
    with pytest.warns(DeprecationWarning, match="SPEAR_LOSS_BACKEND"):
        ref = losses.get_policy_loss_fn(mode)(*inputs(5), "seq-mean-token-mean", config())
    monkeypatch.setenv(LEGACY_LOSS_BACKEND_ENV, "kernels")  # kernel path, kernels' chunked torch backend
    with pytest.warns(DeprecationWarning):
        got = losses.get_policy_loss_fn(mode)(*inputs(5), "seq-mean-token-mean", config())
    torch.testing.assert_close(got[0], ref[0], rtol=1e-6, atol=1e-7)
    monkeypatch.setenv(LEGACY_LOSS_BACKEND_ENV, "gpu")
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError):
        use_kernels(torch.zeros(1))


def test_logprobs_and_entropy_dispatch(monkeypatch) -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 4, 37, generator=g) * 4
    labels = torch.randint(0, 37, (3, 4), generator=g)
    monkeypatch.setenv(BACKEND_ENV, "torch")
    ref = token_ops.logprobs_from_logits(logits, labels), token_ops.entropy_from_logits(logits)
    monkeypatch.setenv(BACKEND_ENV, KERNELS)
    got = token_ops.logprobs_from_logits(logits, labels), token_ops.entropy_from_logits(logits)
    for a, b in zip(ref, got):
        assert b.dtype == a.dtype and b.shape == a.shape
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
