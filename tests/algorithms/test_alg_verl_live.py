"""Live parity with verl 0.9.1 on fresh random inputs (skipped, with the reason, when verl is not
importable; see scripts/make_verl_fixtures.py for the setup)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from spear_engine.algorithms import losses as L
from spear_engine.algorithms import token_ops as F
from spear_engine.algorithms.advantages import compute_grpo_outcome_advantage

SEED = int.from_bytes(os.urandom(4), "little")


def _inputs(gen, batch, width, mask_kind):
    old = -torch.rand(batch, width, generator=gen) * 4
    new = old + torch.randn(batch, width, generator=gen) * 1.5
    adv = torch.randn(batch, width, generator=gen) * 3
    mask = torch.rand(batch, width, generator=gen) > 0.3
    mask[torch.randint(0, batch, (1,), generator=gen)] = False
    return old, new, adv, (mask if mask_kind == "bool" else mask.float())


@pytest.mark.parametrize("loss_mode", ["vanilla", "clip_cov", "kl_cov", "gpg"])
@pytest.mark.parametrize("mask_kind", ["bool", "float"])
@pytest.mark.parametrize("replay", [False, True])
def test_policy_losses_live(verl, loss_mode, mask_kind, replay):
    core_algos, _, OmegaConf = verl
    gen = torch.Generator().manual_seed(SEED)
    config = OmegaConf.create(
        {
            "clip_ratio": 0.2,
            "clip_ratio_low": 0.2,
            "clip_ratio_high": 0.28,
            "clip_ratio_c": 3.0,
            "global_batch_info": {},
            "policy_loss": {
                "loss_mode": loss_mode,
                "clip_cov_ratio": 0.1,
                "clip_cov_lb": -3.0,
                "clip_cov_ub": 6.0,
                "kl_cov_ratio": 0.1,
                "ppo_kl_coef": 0.1,
                "clip_cov_ratio_replay": 0.3,
                "clip_cov_lb_replay": -1.0,
                "clip_cov_ub_replay": 60.0,
                "kl_cov_ratio_replay": 0.2,
            },
        }
    )
    if replay:  # the view is read by verl's own function as well as by ours
        config = L.replay_loss_config(config)
    for agg in L.LOSS_AGG_MODES:
        old, new, adv, mask = _inputs(gen, 7, 13, mask_kind)
        results = []
        for fn in (core_algos.get_policy_loss_fn(loss_mode), L.get_policy_loss_fn(loss_mode)):
            x = new.clone().requires_grad_(True)
            torch.manual_seed(SEED % 1000)
            loss, metrics = fn(old, x, adv, mask, loss_agg_mode=agg, config=config)
            loss.backward()
            results.append((loss.detach(), x.grad, metrics))
        (ref, ref_grad, ref_metrics), (ours, grad, metrics) = results
        msg = f"seed={SEED} {loss_mode} {agg} {mask_kind} replay={replay}"
        assert ours.dtype == ref.dtype and torch.equal(ours, ref), msg
        torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-7, msg=msg)
        assert metrics == pytest.approx(ref_metrics, rel=1e-6, abs=1e-7), msg


def test_kl_entropy_logprobs_grpo_live(verl):
    core_algos, verl_F, _ = verl
    gen = torch.Generator().manual_seed(SEED)
    for kind in L.KL_PENALTY_KINDS + tuple(k + "+" for k in L.KL_PENALTY_KINDS):
        logp, ref = torch.randn(5, 6, generator=gen) * 4, torch.randn(5, 6, generator=gen) * 4
        assert torch.equal(L.kl_penalty(logp, ref, kind), core_algos.kl_penalty(logp, ref, kind)), (
            SEED,
            kind,
        )
    logits = torch.randn(4, 9, 300, generator=gen) * 3
    labels = torch.randint(0, 300, (4, 9), generator=gen)
    torch.testing.assert_close(
        F.entropy_from_logits(logits), verl_F.entropy_from_logits(logits), rtol=1e-6, atol=1e-6
    )
    torch.testing.assert_close(
        F.logprobs_from_logits(logits, labels),
        verl_F.logprobs_from_logits(logits, labels),
        rtol=1e-6,
        atol=1e-6,
    )
    uids = np.array([f"p{int(i)}" for i in torch.randint(0, 6, (30,), generator=gen)], dtype=object)
    rewards = torch.zeros(30, 5)
    rewards[:, -1] = torch.randn(30, generator=gen)
    mask = torch.rand(30, 5, generator=gen) > 0.2
    for norm in (True, False):
        ours, _ = compute_grpo_outcome_advantage(rewards, mask, uids, norm_adv_by_std_in_grpo=norm)
        ref, _ = core_algos.compute_grpo_outcome_advantage(rewards, mask, uids, norm_adv_by_std_in_grpo=norm)
        assert torch.equal(ours, ref), SEED
