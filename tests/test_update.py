"""The actor update loop: normalisation (verl 0.9 vs legacy), replay scaling, sequential vs joint, skips."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spear_engine.algorithms.losses import agg_loss
from spear_engine.config import ActorConfig, PolicyLossConfig
from spear_engine.train.update import LossRows, update_actor


def make_rows(n: int, width: int, seed: int) -> LossRows:
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(n, width, generator=g) > 0.3).float()
    mask[0] = 0.0  # a fully masked row
    return LossRows(
        inputs=torch.randint(0, 5, (n, width), generator=g),
        old_log_prob=-torch.rand(n, width, generator=g),
        advantages=torch.randn(n, 1, generator=g).expand(n, width) * mask,
        loss_mask=mask,
    )


class TablePolicy(torch.nn.Module):
    """logp of token x is a free parameter per (row-agnostic) token id: enough for exact gradient checks."""

    def __init__(self) -> None:
        super().__init__()
        self.logits = torch.nn.Parameter(torch.linspace(-1.0, 1.0, 5))

    def forward_rows(self, idx: np.ndarray, rows: LossRows) -> tuple[torch.Tensor, torch.Tensor]:
        logp_all = torch.log_softmax(self.logits, dim=0)
        tokens = rows.inputs[torch.as_tensor(idx)]
        entropy = -(logp_all.exp() * logp_all).sum().expand(tokens.shape)
        return logp_all[tokens], entropy


class SGDBackend:
    """The backend protocol over plain SGD, counting optimizer steps."""

    def __init__(self, module: torch.nn.Module, lr: float) -> None:
        self.params = list(module.parameters())
        self.optimizer = torch.optim.SGD(self.params, lr=lr)
        self.steps = 0

    def backward(self, loss: torch.Tensor, boundary: bool) -> None:
        loss.backward()

    def step(self) -> tuple[float, bool]:
        norm = float(torch.nn.utils.clip_grad_norm_(self.params, 1e9))
        ok = bool(np.isfinite(norm))
        if ok:
            self.optimizer.step()
            self.steps += 1
        self.optimizer.zero_grad()
        return norm, ok

    def discard_gradients(self) -> None:
        self.optimizer.zero_grad()


def actor(**kw) -> ActorConfig:
    base = dict(
        ppo_mini_batch_size=8, ppo_micro_batch_size_per_gpu=2, entropy_coeff=0.0, grad_clip=1e9,
        clip_ratio_low=0.2, clip_ratio_high=0.28, policy_loss=PolicyLossConfig(loss_mode="vanilla"),
    )  # fmt: skip
    base.update(kw)
    return ActorConfig(**base)


def grad_after_one_step(config: ActorConfig, rows: LossRows, replay: LossRows | None = None, coef: float = 0.0,
                        mode: str = "sequential") -> tuple[torch.Tensor, dict[str, float]]:  # fmt: skip
    """Run update_actor with SGD(lr=1) and return the total parameter change (= - sum of gradients)."""
    policy = TablePolicy()
    before = policy.logits.detach().clone()
    metrics = update_actor(policy.forward_rows, SGDBackend(policy, 1.0), config, rows, replay, coef, mode)
    return before - policy.logits.detach(), metrics


def reference_gradient(config: ActorConfig, rows: LossRows, idx: np.ndarray, global_info: dict) -> torch.Tensor:
    """Gradient of the whole mini-batch loss computed in one piece (the verl 0.9 definition)."""
    policy = TablePolicy()
    logp, _ = policy.forward_rows(idx, rows)
    t = torch.as_tensor(idx)
    ratio = torch.exp((logp - rows.old_log_prob[t]).clamp(-20, 20))
    adv = rows.advantages[t]
    l1, l2 = -adv * ratio, -adv * ratio.clamp(0.8, 1.28)
    clipped = torch.maximum(l1, l2)
    loss_mat = torch.where(adv < 0, torch.minimum(-adv * config.clip_ratio_c, clipped), clipped)
    loss = agg_loss(loss_mat, rows.loss_mask[t], config.loss_agg_mode, **global_info)
    loss.backward()
    return policy.logits.grad.clone()


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_verl09_normalisation_equals_one_piece_mini_batch(mode: str) -> None:
    rows = make_rows(8, 6, seed=1)
    config = actor(loss_agg_mode=mode)
    delta, _ = grad_after_one_step(config, rows)
    mask = rows.loss_mask
    info = {"batch_num_tokens": mask.sum(), "global_batch_size": (mask.sum(-1) > 0).sum()}
    expected = reference_gradient(config, rows, np.arange(8), info)
    torch.testing.assert_close(delta, expected, rtol=1e-5, atol=1e-7)


def test_legacy_normalisation_averages_micro_batches() -> None:
    rows = make_rows(8, 6, seed=2)
    config = actor(loss_agg_mode="seq-mean-token-sum-norm", legacy_agg_loss=True)
    delta, _ = grad_after_one_step(config, rows)
    expected = sum(
        reference_gradient(config, rows, np.arange(s, s + 2), {"global_batch_size": 1}) for s in range(0, 8, 2)
    ) / 4  # fmt: skip
    torch.testing.assert_close(delta, expected, rtol=1e-5, atol=1e-7)


def test_replay_contribution_scales_with_coefficient_and_vanishes_at_zero() -> None:
    rows, replay = make_rows(8, 6, seed=3), make_rows(8, 6, seed=4)
    config = actor()
    base, _ = grad_after_one_step(config, rows)
    zero, metrics = grad_after_one_step(config, rows, replay, coef=0.0, mode="joint")
    torch.testing.assert_close(zero, base)
    assert metrics["actor/replay_rows"] == 0.0
    half, _ = grad_after_one_step(config, rows, replay, coef=0.5, mode="joint")
    full, _ = grad_after_one_step(config, rows, replay, coef=1.0, mode="joint")
    torch.testing.assert_close(full - base, 2 * (half - base), rtol=1e-5, atol=1e-7)


def test_sequential_replay_takes_extra_optimizer_steps_and_logs_replay_metrics() -> None:
    rows, replay = make_rows(8, 6, seed=5), make_rows(16, 6, seed=6)
    policy = TablePolicy()
    backend = SGDBackend(policy, 0.1)
    metrics = update_actor(policy.forward_rows, backend, actor(), rows, replay, 1.0, "sequential")
    assert backend.steps == 1 + 2  # one on-policy mini-batch, two replay mini-batches of 8
    assert "actor/pg_loss_replay" in metrics and "actor/grad_norm_replay" in metrics
    backend.steps = 0
    update_actor(policy.forward_rows, backend, actor(), rows, replay, 1.0, "joint")
    assert backend.steps == 1


def test_non_finite_gradient_skips_the_step_and_leaves_parameters() -> None:
    rows = make_rows(8, 6, seed=7)
    rows.advantages[1, :] = float("nan")
    rows.loss_mask[1, :] = 1.0
    policy = TablePolicy()
    before = policy.logits.detach().clone()
    metrics = update_actor(policy.forward_rows, SGDBackend(policy, 1.0), actor(), rows)
    assert metrics["actor/skipped_steps"] == 1.0
    torch.testing.assert_close(policy.logits.detach(), before)
