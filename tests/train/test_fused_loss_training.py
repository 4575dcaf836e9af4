"""The fused head + loss path of the update (``actor.fused_loss``) against the torch loss path (the oracle).

One PPO step of the tiny model on packed rows: on-policy rows with given old log-probs, truncated-IS
weights and a joint replay part (replay constants, scaled by c(t)), then on-policy rows whose old
log-probs come from the step's own forward. Gradients, ``pg_loss``, clip fractions and entropies must
agree for every loss mode. Clip-Cov runs with ``clip_cov_ratio=1`` so that every candidate token is
detached on both paths (their random draws come from different generator streams).
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_packed_sequences import episode_rows

from spear_engine.config import ActorConfig, PolicyLossConfig
from spear_engine.models import load_model
from spear_engine.train.backends import TorchBackend
from spear_engine.train.policy import FusedHeadPolicy, SequenceBatch
from spear_engine.train.update import LossRows, update_actor


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    model, _ = load_model("tiny")
    return model


class RecordingBackend(TorchBackend):
    def step(self) -> tuple[float, bool]:
        self.grads = {n: p.grad.clone() for n, p in self.hf_model.named_parameters() if p.grad is not None}
        return super().step()


def _rows(inputs: SequenceBatch, seed: int, with_old: bool, with_is: bool) -> LossRows:
    g = torch.Generator().manual_seed(seed)
    mask = inputs.response_attention.float()
    mask[:, -1] *= (torch.rand(len(mask), generator=g) > 0.4).float()
    with torch.no_grad():  # old log-probs near the current ones, so ratios straddle the clip range
        noise = 0.3 * torch.randn(mask.shape, generator=g)
    old = (-torch.rand(mask.shape, generator=g) * 3 - 8 + noise) * mask if with_old else None
    adv = torch.randn(len(mask), 1, generator=g).expand_as(mask).contiguous() * mask
    weights = (torch.rand(mask.shape, generator=g) * 1.5 + 0.2) * mask if with_is else None
    return LossRows(inputs, old, adv, mask, weights, tokens=inputs.row_tokens)


def _config(mode: str, agg: str) -> ActorConfig:
    policy = PolicyLossConfig(loss_mode=mode, clip_cov_ratio=1.0, clip_cov_lb=-100.0, clip_cov_ub=100.0,
                              kl_cov_ratio=0.2, clip_cov_ratio_replay=1.0, clip_cov_lb_replay=-50.0,
                              clip_cov_ub_replay=50.0, kl_cov_ratio_replay=0.3, replay_uses_replay_params=True)  # fmt: skip
    return ActorConfig(ppo_mini_batch_size=64, ppo_micro_batch_size_per_gpu=2, lr=1e-3, grad_clip=1e9,
                       entropy_coeff=0.01, loss_agg_mode=agg, clip_ratio_high=0.28, clip_ratio_c=3.0,
                       ppo_max_token_len_per_gpu=60, policy_loss=policy)  # fmt: skip


def _step(tiny, config, on_policy, replay, fused):
    backend = RecordingBackend(FusedHeadPolicy(copy.deepcopy(tiny), packed=True), lr=1e-3, weight_decay=0.0,
                               grad_clip=1e9)  # fmt: skip

    fused_calls = []

    def forward(idx, rows, loss=None):
        selected = rows.inputs.select(torch.as_tensor(idx))
        fused_calls.append(loss is not None)
        return backend.forward(selected) if loss is None else backend.forward(selected, loss)

    on_policy, replay = copy.copy(on_policy), copy.copy(replay) if replay is not None else None
    metrics = update_actor(forward, backend, config, on_policy, replay, replay_coef=0.7, replay_update="joint",
                           fused=fused)  # fmt: skip
    assert fused_calls and all(call == fused for call in fused_calls)  # every micro-batch took the asked path
    return backend.grads, metrics, on_policy


def _compare(tiny, config, on_policy, replay):
    (g_ref, m_ref, rows_ref), (g_fused, m_fused, rows_fused) = (
        _step(tiny, config, on_policy, replay, fused) for fused in (False, True)
    )
    assert g_ref.keys() == g_fused.keys() and g_ref
    for name, grad in g_ref.items():
        err = float((g_fused[name] - grad).norm()) / (float(grad.norm()) + 1e-20)
        assert err < 1e-4, (name, err)
    assert m_fused.keys() == m_ref.keys()
    for key, value in m_ref.items():
        if key.startswith("actor/grad_norm"):
            assert m_fused[key] == pytest.approx(value, rel=1e-4)
        else:
            assert m_fused[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    return rows_ref, rows_fused


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("mode", ["vanilla", "clip_cov", "kl_cov", "gpg"])
def test_fused_update_matches_the_torch_loss(tiny: torch.nn.Module, mode: str, agg: str) -> None:
    vocab = tiny.config.vocab_size
    on_policy = _rows(episode_rows("step", 61, vocab), 61, with_old=True, with_is=True)
    replay = _rows(episode_rows("trajectory", 62, vocab), 62, with_old=True, with_is=False)
    _compare(tiny, _config(mode, agg), on_policy, replay)


@pytest.mark.parametrize("mode", ["vanilla", "clip_cov", "kl_cov"])
def test_fused_update_takes_old_log_probs_from_its_forward(tiny: torch.nn.Module, mode: str) -> None:
    on_policy = _rows(episode_rows("step", 71, tiny.config.vocab_size), 71, with_old=False, with_is=False)
    rows_ref, rows_fused = _compare(tiny, _config(mode, "token-mean"), on_policy, None)
    assert rows_ref.forward_log_prob is not None and rows_fused.forward_log_prob is not None
    torch.testing.assert_close(rows_fused.forward_log_prob, rows_ref.forward_log_prob, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rows_fused.forward_entropy, rows_ref.forward_entropy, rtol=1e-5, atol=1e-5)
