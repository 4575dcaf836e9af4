"""losses: policy losses, aggregation, KL kinds, entropy loss, actor loss, replay config view."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pydantic
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spear_engine.algorithms import losses as L
from spear_engine.algorithms.losses import (
    actor_loss,
    agg_loss,
    compute_entropy_loss,
    compute_policy_loss_clip_cov,
    compute_policy_loss_gpg,
    compute_policy_loss_kl_cov,
    compute_policy_loss_vanilla,
    get_policy_loss_fn,
    kl_penalty,
    legacy_global_batch_info,
    register_policy_loss,
    replay_loss_config,
)
from spear_engine.algorithms.token_ops import entropy_from_logits


def cfg(**policy: Any) -> SimpleNamespace:
    base = {
        "clip_cov_ratio": 0.0002,
        "clip_cov_lb": 1.0,
        "clip_cov_ub": 5.0,
        "kl_cov_ratio": 0.0002,
        "ppo_kl_coef": 0.1,
    }
    base.update(policy)
    return SimpleNamespace(
        clip_ratio=0.2,
        clip_ratio_low=0.2,
        clip_ratio_high=0.28,
        clip_ratio_c=3.0,
        global_batch_info={},
        policy_loss=SimpleNamespace(**base),
    )


# --------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------
def test_registry_names_and_unknown_name():
    for name, fn in [
        ("vanilla", compute_policy_loss_vanilla),
        ("clip_cov", compute_policy_loss_clip_cov),
        ("kl_cov", compute_policy_loss_kl_cov),
        ("gpg", compute_policy_loss_gpg),
    ]:
        assert get_policy_loss_fn(name) is fn
    with pytest.raises(ValueError, match=r"clip-cov.*vanilla.*clip_cov.*kl_cov.*gpg"):
        get_policy_loss_fn("clip-cov")


def test_register_a_new_loss():
    @register_policy_loss("_test_zero")
    def zero(
        old_log_prob,
        log_prob,
        advantages,
        response_mask,
        loss_agg_mode="token-mean",
        config=None,
        rollout_is_weights=None,
    ):
        return (log_prob * 0).sum(), {}

    try:
        assert get_policy_loss_fn("_test_zero") is zero
    finally:
        L.POLICY_LOSS_REGISTRY.pop("_test_zero")


# --------------------------------------------------------------------------------------------
# vanilla (hand case)
# --------------------------------------------------------------------------------------------
def _vanilla_hand_inputs():
    old = torch.zeros(1, 5)
    new = torch.log(torch.tensor([[1.5, 0.5, 5.0, 1.1, 7.0]]))
    adv = torch.tensor([[1.0, -1.0, -1.0, 2.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]], dtype=torch.bool)
    return old, new, adv, mask


def test_vanilla_by_hand():
    # token 1: r=1.5, A=+1 -> max(-1.5, -1.28) = -1.28 (clipped high)
    # token 2: r=0.5, A=-1 -> max(0.5, 0.8) = 0.8 (clipped low), dual bound 3 not binding
    # token 3: r=5,   A=-1 -> max(5, 1.28) = 5, dual clip -> min(5, 3) = 3
    # token 4: r=1.1, A=+2 -> -2.2 (inside the trust region); token 5 masked
    old, new, adv, mask = _vanilla_hand_inputs()
    new.requires_grad_(True)
    loss, metrics = compute_policy_loss_vanilla(old, new, adv, mask, "token-mean", cfg())
    assert loss.item() == pytest.approx((-1.28 + 0.8 + 3.0 - 2.2) / 4, rel=1e-6)
    assert metrics["actor/pg_clipfrac"] == pytest.approx(0.5)
    assert metrics["actor/pg_clipfrac_lower"] == pytest.approx(0.25)
    assert metrics["actor/ppo_kl"] == pytest.approx(
        -(math.log(1.5) + math.log(0.5) + math.log(5) + math.log(1.1)) / 4, rel=1e-5
    )
    loss.backward()
    # only token 4 is unclipped: d(-A r)/d logp = -A r = -2.2, / 4 tokens
    assert new.grad.tolist()[0] == pytest.approx([0.0, 0.0, 0.0, -0.55, 0.0], abs=1e-6)


def test_vanilla_clamps_the_log_ratio_at_20():
    old = torch.zeros(1, 2)
    new = torch.tensor([[30.0, 25.0]], requires_grad=True)
    adv = torch.tensor([[1.0, -1.0]])
    loss, metrics = compute_policy_loss_vanilla(old, new, adv, torch.ones(1, 2), "token-sum", cfg())
    assert metrics["actor/ppo_kl"] == pytest.approx(-20.0)  # both deltas clamp to 20
    # token 1: A > 0, clipped at 1.28 -> -1.28; token 2: A < 0, r = e^20 -> dual bound -A c = 3
    assert loss.item() == pytest.approx(-1.28 + 3.0, rel=1e-6)


def test_vanilla_uses_clip_ratio_when_low_high_are_null():
    config = cfg()
    config.clip_ratio_low = None
    config.clip_ratio_high = None
    config.clip_ratio = 0.1
    old, new, adv, mask = _vanilla_hand_inputs()
    loss, _ = compute_policy_loss_vanilla(old, new, adv, mask, "token-mean", config)
    assert loss.item() == pytest.approx((-1.1 + 0.9 + 3.0 - 2.2) / 4, rel=1e-6)


def test_vanilla_config_errors():
    old, new, adv, mask = _vanilla_hand_inputs()
    with pytest.raises(ValueError):
        compute_policy_loss_vanilla(old, new, adv, mask, "token-mean", None)
    config = cfg()
    config.clip_ratio_c = 1.0
    with pytest.raises(ValueError, match="clip_ratio_c"):
        compute_policy_loss_vanilla(old, new, adv, mask, "token-mean", config)


class _GetConfig(SimpleNamespace):
    def get(self, key, default=None):
        return 10.0 if key == "clip_ratio_c" else getattr(self, key, default)


def test_clip_ratio_c_is_read_with_get_when_available():
    old, new, adv, mask = _vanilla_hand_inputs()
    base = cfg()
    with_get = _GetConfig(**vars(base))  # attribute says 3.0, .get says 10.0
    loss3, _ = compute_policy_loss_vanilla(old, new, adv, mask, "token-mean", base)
    loss10, _ = compute_policy_loss_vanilla(old, new, adv, mask, "token-mean", with_get)
    assert loss3.item() == pytest.approx((-1.28 + 0.8 + 3.0 - 2.2) / 4, rel=1e-6)
    assert loss10.item() == pytest.approx((-1.28 + 0.8 + 5.0 - 2.2) / 4, rel=1e-6)
    no_attr = SimpleNamespace(clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.28)
    loss_default, _ = compute_policy_loss_vanilla(old, new, adv, mask, "token-mean", no_attr)
    assert loss_default.item() == pytest.approx(loss3.item())


@dataclass
class _PolicyDC:
    clip_cov_ratio: float = 0.5
    clip_cov_lb: float = -10.0
    clip_cov_ub: float = 10.0
    kl_cov_ratio: float = 0.3
    ppo_kl_coef: float = 0.1


@dataclass
class _ActorDC:
    clip_ratio: float = 0.2
    clip_ratio_low: float | None = 0.2
    clip_ratio_high: float | None = 0.28
    clip_ratio_c: float = 3.0
    policy_loss: _PolicyDC = field(default_factory=_PolicyDC)
    global_batch_info: dict = field(default_factory=dict)


class _PolicyPD(pydantic.BaseModel):
    clip_cov_ratio: float = 0.5
    clip_cov_lb: float = -10.0
    clip_cov_ub: float = 10.0
    kl_cov_ratio: float = 0.3
    ppo_kl_coef: float = 0.1


class _ActorPD(pydantic.BaseModel):
    clip_ratio: float = 0.2
    clip_ratio_low: float | None = 0.2
    clip_ratio_high: float | None = 0.28
    clip_ratio_c: float = 3.0
    policy_loss: _PolicyPD = _PolicyPD()


_DICT_CONFIG = {
    "clip_ratio": 0.2,
    "clip_ratio_low": 0.2,
    "clip_ratio_high": 0.28,
    "clip_ratio_c": 3.0,
    "policy_loss": {
        "clip_cov_ratio": 0.5,
        "clip_cov_lb": -10.0,
        "clip_cov_ub": 10.0,
        "kl_cov_ratio": 0.3,
        "ppo_kl_coef": 0.1,
    },
}


@pytest.mark.parametrize("name", ["vanilla", "clip_cov", "kl_cov", "gpg"])
def test_every_config_flavour_gives_the_same_result(name):
    gen = torch.Generator().manual_seed(4)
    old = torch.randn(3, 6, generator=gen)
    new = old + torch.randn(3, 6, generator=gen)
    adv = torch.randn(3, 6, generator=gen)
    mask = torch.rand(3, 6, generator=gen) > 0.3
    results = []
    for config in (
        _ActorDC(),
        _ActorPD(),
        _DICT_CONFIG,
        SimpleNamespace(**{**vars(_ActorDC()), "policy_loss": _PolicyDC()}),
    ):
        torch.manual_seed(0)
        loss, metrics = get_policy_loss_fn(name)(old, new, adv, mask, "seq-mean-token-mean", config)
        results.append((loss.item(), metrics))
    assert all(r == results[0] for r in results)


# --------------------------------------------------------------------------------------------
# clip_cov
# --------------------------------------------------------------------------------------------
def _clip_cov_reference_keep(old, new, adv, mask, ratio, lb, ub, eps_low=0.2, eps_high=0.28):
    """Independent statement of Clip-Cov's token selection (draws with the same global-RNG randperm)."""
    r = torch.exp(new - old)
    clipped = (-adv * torch.clamp(r, 1 - eps_low, 1 + eps_high)) > (-adv * r)
    m = mask.float()
    n = m.sum()
    mean_a = (adv * m).sum() / (n + 1e-8)
    mean_l = (new * m).sum() / (n + 1e-8)
    cov = (adv - mean_a) * (new - mean_l)
    cand = (cov > lb) & (cov < ub) & (m > 0) & ~clipped
    idx = torch.nonzero(cand)
    keep = torch.ones_like(adv)
    if len(idx):
        budget = max(int(ratio * n.item()), 1)
        idx = idx[torch.randperm(len(idx))[: min(budget, len(idx))]]
        keep[idx[:, 0], idx[:, 1]] = 0
    return keep, cand


def test_clip_cov_detaches_all_candidates_when_budget_allows():
    gen = torch.Generator().manual_seed(5)
    old = torch.zeros(2, 8)
    new = torch.randn(2, 8, generator=gen) * 0.05  # ratios near 1: little PPO clipping
    adv = torch.randn(2, 8, generator=gen) * 3
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1, 6:] = False
    config = cfg(clip_cov_ratio=1.0, clip_cov_lb=-1e-3, clip_cov_ub=100.0)
    new.requires_grad_(True)
    loss, metrics = compute_policy_loss_clip_cov(old, new, adv, mask, "token-mean", config)
    keep, cand = _clip_cov_reference_keep(old, new.detach(), adv, mask, 1.0, -1e-3, 100.0)
    assert cand.sum() > 0 and torch.equal(keep == 0, cand)
    r = torch.exp(new.detach() - old)
    per_token = torch.maximum(-adv * r, -adv * torch.clamp(r, 0.8, 1.28)) * keep
    assert loss.item() == pytest.approx(
        (per_token * mask).sum().item() / mask.sum().item(), rel=1e-6, abs=1e-7
    )
    assert metrics["actor/pg_clipfrac"] == pytest.approx(cand.sum().item() / mask.sum().item(), rel=1e-6)
    assert "actor/pg_clipfrac_lower" not in metrics  # verl 0.9 clip_cov reports two metrics
    loss.backward()
    assert torch.all(new.grad[cand] == 0)


def test_clip_cov_seeded_draw_matches_reference_and_is_bounded():
    gen = torch.Generator().manual_seed(6)
    old = torch.zeros(4, 25)
    new = torch.randn(4, 25, generator=gen) * 0.3
    adv = torch.randn(4, 25, generator=gen) * 2
    mask = torch.rand(4, 25, generator=gen) > 0.2
    config = cfg(clip_cov_ratio=0.05, clip_cov_lb=-5.0, clip_cov_ub=5.0)
    torch.manual_seed(42)
    _, metrics = compute_policy_loss_clip_cov(old, new, adv, mask, "token-mean", config)
    torch.manual_seed(42)
    keep, cand = _clip_cov_reference_keep(old, new, adv, mask, 0.05, -5.0, 5.0)
    budget = max(int(0.05 * mask.sum().item()), 1)
    assert (keep == 0).sum().item() == min(budget, cand.sum().item())
    assert torch.all(cand[keep == 0])
    assert metrics["actor/pg_clipfrac"] == pytest.approx(
        (keep == 0).sum().item() / mask.sum().item(), rel=1e-6
    )
    # the same seed selects the same tokens: the losses agree exactly
    losses = []
    for _ in range(2):
        torch.manual_seed(7)
        losses.append(compute_policy_loss_clip_cov(old, new, adv, mask, "token-mean", config)[0])
    assert torch.equal(losses[0], losses[1])


def test_clip_cov_has_no_clamp_and_no_dual_clip():
    old = torch.zeros(1, 1)
    new = torch.tensor([[math.log(50.0)]])
    adv = torch.tensor([[-1.0]])
    config = cfg(clip_cov_lb=100.0, clip_cov_ub=200.0)  # no candidate
    loss, _ = compute_policy_loss_clip_cov(old, new, adv, torch.ones(1, 1), "token-mean", config)
    assert loss.item() == pytest.approx(50.0, rel=1e-5)  # vanilla would give the dual bound 3
    config.policy_loss.clip_cov_ratio = 0.0
    with pytest.raises(ValueError):
        compute_policy_loss_clip_cov(old, new, adv, torch.ones(1, 1), "token-mean", config)


def test_clip_cov_null_constants_use_verl_fallbacks():
    gen = torch.Generator().manual_seed(8)
    old = torch.zeros(3, 10)
    new = torch.randn(3, 10, generator=gen)
    adv = torch.randn(3, 10, generator=gen) * 4
    mask = torch.ones(3, 10)
    null = cfg(clip_cov_ratio=None, clip_cov_lb=None, clip_cov_ub=None)
    explicit = cfg(clip_cov_ratio=0.0002, clip_cov_lb=1.0, clip_cov_ub=5.0)
    torch.manual_seed(1)
    a = compute_policy_loss_clip_cov(old, new, adv, mask, "token-sum", null)
    torch.manual_seed(1)
    b = compute_policy_loss_clip_cov(old, new, adv, mask, "token-sum", explicit)
    assert torch.equal(a[0], b[0]) and a[1] == b[1]


# --------------------------------------------------------------------------------------------
# kl_cov, gpg
# --------------------------------------------------------------------------------------------
def test_kl_cov_by_hand():
    old = torch.zeros(1, 4)
    new = torch.tensor([[0.1, -0.2, 0.3, 0.0]])
    adv = torch.tensor([[2.0, 0.0, -1.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    # valid tokens: A = [2, 0, -1] (mean 1/3), logp = [0.1, -0.2, 0.3] (mean 1/15)
    cov = [(2 - 1 / 3) * (0.1 - 1 / 15), (0 - 1 / 3) * (-0.2 - 1 / 15), (-1 - 1 / 3) * (0.3 - 1 / 15)]
    top = max(range(3), key=lambda i: cov[i])
    assert top == 1
    config = cfg(kl_cov_ratio=0.34, ppo_kl_coef=0.5)  # max(1, floor(3 * 0.34)) = 1 token
    loss, metrics = compute_policy_loss_kl_cov(old, new, adv, mask, "token-mean", config)
    r = [math.exp(0.1), math.exp(-0.2), math.exp(0.3)]
    per_token = [-2 * r[0], -0 * r[1] + 0.5 * 0.2, 1 * r[2]]
    assert loss.item() == pytest.approx(sum(per_token) / 3, rel=1e-6)
    assert metrics == {"actor/ppo_kl": pytest.approx((0.1 + 0.2 + 0.3) / 3, rel=1e-6)}


def test_kl_cov_no_valid_token_and_bad_ratio():
    old = torch.zeros(2, 3)
    loss, _ = compute_policy_loss_kl_cov(
        old, old + 0.1, torch.ones(2, 3), torch.zeros(2, 3), "token-sum", cfg()
    )
    assert loss.item() == 0.0
    with pytest.raises(ValueError):
        compute_policy_loss_kl_cov(old, old, old, torch.ones(2, 3), "token-sum", cfg(kl_cov_ratio=-1.0))


def test_gpg_by_hand_and_rollout_weights():
    logp = torch.tensor([[-1.0, -2.0, -3.0]], requires_grad=True)
    adv = torch.tensor([[1.0, 2.0, 3.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, metrics = compute_policy_loss_gpg(None, logp, adv, mask, "token-mean", None)
    assert loss.item() == pytest.approx((1 + 4) / 2) and metrics == {}
    loss.backward()
    assert logp.grad.tolist() == [[-0.5, -1.0, 0.0]]
    weights = torch.tensor([[2.0, 0.5, 9.0]])
    weighted, _ = compute_policy_loss_gpg(
        None, logp, adv, mask, "token-sum", None, rollout_is_weights=weights
    )
    assert weighted.item() == pytest.approx(2 * 1 + 0.5 * 4)


# --------------------------------------------------------------------------------------------
# agg_loss
# --------------------------------------------------------------------------------------------
LOSS_MAT = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0], [7.0, 7.0, 7.0, 7.0]])
AGG_MASK = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)


@pytest.mark.parametrize(
    ("mode", "kwargs", "expected"),
    [
        ("token-mean", {}, 103 / 6),
        ("token-mean", {"batch_num_tokens": 10, "dp_size": 2}, 103 / 10 * 2),
        ("token-sum", {}, 103.0),
        ("token-sum", {"dp_size": 4}, 412.0),
        ("seq-mean-token-sum", {}, (3 + 100) / 2),
        ("seq-mean-token-sum", {"global_batch_size": 4, "dp_size": 2}, 103 / 4 * 2),
        ("seq-mean-token-sum-norm", {}, (3 + 100) / 2 / 4),
        ("seq-mean-token-sum-norm", {"global_batch_size": 1}, 103 / 4),  # the older verl (official SPEAR)
        ("seq-mean-token-sum-norm", {"loss_scale_factor": 10}, 103 / 2 / 10),
        ("seq-mean-token-mean", {}, (1.5 + 25) / 2),
        ("seq-mean-token-mean", {"global_batch_size": 3}, (1.5 + 25) / 3),
    ],
)
def test_agg_loss_by_hand(mode, kwargs, expected):
    for mask in (AGG_MASK, AGG_MASK.float()):
        assert agg_loss(LOSS_MAT, mask, mode, **kwargs).item() == pytest.approx(expected, rel=1e-6)


def test_agg_loss_errors_and_empty_masks():
    with pytest.raises(ValueError, match="Invalid loss_agg_mode"):
        agg_loss(LOSS_MAT, AGG_MASK, "seq-sum")
    with pytest.raises(ValueError):
        agg_loss(LOSS_MAT, AGG_MASK, "token-mean", dp_size=2)
    with pytest.raises(ValueError):
        agg_loss(LOSS_MAT, AGG_MASK, "seq-mean-token-mean", dp_size=2)
    empty = torch.zeros_like(AGG_MASK)
    assert math.isnan(agg_loss(LOSS_MAT, empty, "token-mean").item())  # 0 / 0, as verl 0.9
    assert agg_loss(LOSS_MAT, empty, "token-sum").item() == 0.0
    nan_outside = LOSS_MAT.clone()
    nan_outside[2] = float("nan")
    for mode in L.LOSS_AGG_MODES:
        assert not math.isnan(agg_loss(nan_outside, AGG_MASK, mode).item())


def _old_verl_agg(loss_mat, mask, mode):
    """The older verl agg_loss of the official SPEAR code, written out independently."""
    m = mask.double()
    lm = loss_mat.double() * m
    if mode == "token-mean":
        return lm.sum() / (m.sum() + 1e-8)
    if mode == "token-sum":
        return lm.sum()
    if mode == "seq-mean-token-sum":
        return lm.sum(-1).mean()
    if mode == "seq-mean-token-mean":
        return (lm.sum(-1) / m.sum(-1)).mean()
    return lm.sum() / mask.shape[-1]


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 6),
    width=st.integers(1, 9),
    mode=st.sampled_from(L.LOSS_AGG_MODES),
    seed=st.integers(0, 2**31 - 1),
    empty_rows=st.booleans(),
)
def test_legacy_global_batch_info_reproduces_the_old_aggregation(rows, width, mode, seed, empty_rows):
    gen = torch.Generator().manual_seed(seed)
    loss_mat = torch.randn(rows, width, generator=gen)
    mask = torch.rand(rows, width, generator=gen) > 0.3
    mask[:, 0] = True
    if empty_rows and mode != "seq-mean-token-mean":  # an empty row made the old seq-mean-token-mean NaN
        mask[0] = False
    ours = agg_loss(loss_mat, mask, mode, **legacy_global_batch_info(mode, mask))
    torch.testing.assert_close(ours.double(), _old_verl_agg(loss_mat, mask, mode), rtol=1e-5, atol=1e-6)


def test_legacy_global_batch_info_unknown_mode():
    with pytest.raises(ValueError):
        legacy_global_batch_info("nope", AGG_MASK)


# --------------------------------------------------------------------------------------------
# KL penalty, entropy loss, actor loss
# --------------------------------------------------------------------------------------------
def test_kl_penalty_kinds_by_hand():
    logp = torch.tensor([-1.0, -2.0, 0.0])
    ref = torch.tensor([-1.5, -1.0, -30.0])
    delta = [0.5, -1.0, 30.0]
    expect = {
        "kl": delta,
        "abs": [0.5, 1.0, 30.0],
        "mse": [0.125, 0.5, 450.0],
        # k3 = e^{-d} + d - 1 with -d clamped to +-20, the result to [-10, 10]: d = 30 gives 19 -> 10
        "low_var_kl": [math.exp(-0.5) + 0.5 - 1, math.exp(1.0) - 1 - 1, 10.0],
    }
    aliases = {"k1": "kl", "k2": "mse", "k3": "low_var_kl"}
    for kind in ["kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3"]:
        want = expect[aliases.get(kind, kind)]
        assert kl_penalty(logp, ref, kind).tolist() == pytest.approx(want, rel=1e-6)
        assert kl_penalty(logp, ref, kind + "+").tolist() == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("kind", ["kl", "abs", "k3", "low_var_kl", "k2"])
def test_straight_through_kinds_take_the_k2_gradient(kind):
    logp = torch.tensor([-1.0, -2.0, 0.5], requires_grad=True)
    ref = torch.tensor([-1.5, -1.0, 0.0])
    kl_penalty(logp, ref, kind + "+").sum().backward()
    assert logp.grad.tolist() == pytest.approx([0.5, -1.0, 0.5])


def test_kl_penalty_full_and_unknown():
    x = torch.zeros(2)
    with pytest.raises(NotImplementedError):
        kl_penalty(x, x, "full")
    with pytest.raises(NotImplementedError):
        kl_penalty(x, x, "k4")


def test_entropy_loss_is_aggregated_entropy():
    gen = torch.Generator().manual_seed(9)
    logits = torch.randn(2, 3, 11, generator=gen)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    h = entropy_from_logits(logits)
    assert compute_entropy_loss(logits, mask).item() == pytest.approx(
        (h[0, 0] + h[0, 1] + h[1, 0]).item() / 3, rel=1e-6
    )
    assert compute_entropy_loss(logits, mask, "seq-mean-token-sum-norm").item() == pytest.approx(
        (h[0, 0] + h[0, 1] + h[1, 0]).item() / 2 / 3, rel=1e-6
    )


def test_actor_loss():
    pg, ent, kl = torch.tensor(1.0), torch.tensor(2.0), torch.tensor(4.0)
    assert actor_loss(pg, ent, 0.001).item() == pytest.approx(1.0 - 0.002)
    assert actor_loss(pg, ent, 0.001, kl, 0.5).item() == pytest.approx(1.0 - 0.002 + 2.0)
    assert actor_loss(pg, None, 0.0).item() == 1.0
    with pytest.raises(ValueError):
        actor_loss(pg, None, 0.1)


# --------------------------------------------------------------------------------------------
# replay config view
# --------------------------------------------------------------------------------------------
def test_replay_view_substitutes_replay_constants():
    config = cfg(
        clip_cov_ratio_replay=0.02, clip_cov_lb_replay=2.0, clip_cov_ub_replay=60.0, kl_cov_ratio_replay=0.03
    )
    view = replay_loss_config(config)
    pl = view.policy_loss
    assert (pl.clip_cov_ratio, pl.clip_cov_lb, pl.clip_cov_ub, pl.kl_cov_ratio) == (0.02, 2.0, 60.0, 0.03)
    assert pl.ppo_kl_coef == 0.1 and view.clip_ratio_high == 0.28 and view.get("clip_ratio_c", 9) == 3.0
    assert config.policy_loss.clip_cov_ratio == 0.0002  # the original is untouched
    with pytest.raises(AttributeError):
        view.clip_ratio = 1.0


@pytest.mark.parametrize("present", [True, False])
def test_replay_view_official_fallbacks(present):
    config = cfg(
        clip_cov_ratio_replay=None, clip_cov_lb_replay=None, clip_cov_ub_replay=None, kl_cov_ratio_replay=None
    )
    if not present:  # a verl 0.9 config has no *_replay keys at all
        config = cfg()
    pl = replay_loss_config(config).policy_loss
    assert (pl.clip_cov_ratio, pl.clip_cov_lb, pl.clip_cov_ub, pl.kl_cov_ratio) == (0.002, 1.0, 40.0, 0.8)


def test_replay_view_drives_the_losses():
    gen = torch.Generator().manual_seed(10)
    old = torch.zeros(3, 12)
    new = torch.randn(3, 12, generator=gen) * 0.2
    adv = torch.randn(3, 12, generator=gen) * 3
    mask = torch.ones(3, 12)
    config = cfg(
        clip_cov_ratio_replay=0.3, clip_cov_lb_replay=-2.0, clip_cov_ub_replay=60.0, kl_cov_ratio_replay=0.2
    )
    direct = cfg(clip_cov_ratio=0.3, clip_cov_lb=-2.0, clip_cov_ub=60.0, kl_cov_ratio=0.2)
    for fn in (compute_policy_loss_clip_cov, compute_policy_loss_kl_cov):
        torch.manual_seed(3)
        a = fn(old, new, adv, mask, "token-mean", replay_loss_config(config))
        torch.manual_seed(3)
        b = fn(old, new, adv, mask, "token-mean", direct)
        assert torch.equal(a[0], b[0]) and a[1] == b[1]
    with pytest.raises(ValueError):
        replay_loss_config(SimpleNamespace(clip_ratio=0.2))


def test_replay_view_of_a_mapping_config():
    view = replay_loss_config(
        {**_DICT_CONFIG, "policy_loss": {**_DICT_CONFIG["policy_loss"], "clip_cov_ub_replay": 7.0}}
    )
    assert view.policy_loss.clip_cov_ub == 7.0 and view.clip_ratio == 0.2 and view.get("missing", 5) == 5
    with pytest.raises(AttributeError):
        _ = view.missing
