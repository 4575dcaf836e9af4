"""Reference-model KL loss (``actor.use_kl_loss``) and rollout importance weights (``rollout.rollout_is``):
each value checked against a formula computed here from the log-probs, in the update loop and through
the trainer with the tiny model (a scripted rollout engine where the behaviour log-probs must be known)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import spear_engine.step as step_module
from spear_engine.algorithms.rollout_correction import rollout_correction
from spear_engine.config import ActorConfig, PolicyLossConfig
from spear_engine.config_loading import load_config
from spear_engine.envs.base import Action, Observation, StepResult, register_env
from spear_engine.metrics import read_metrics
from spear_engine.rollout.engine import Generation, SamplingParams
from spear_engine.train.trainer import Trainer
from spear_engine.train.update import LossRows, update_actor

# One torch thread: these tests are about values, and two threads on a shared 2-core machine crawl.
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("one_torch_thread")]


# ------------------------------------------------------------------------------------------------
# the formulas, written out independently of spear_engine.algorithms.losses
# ------------------------------------------------------------------------------------------------
def kl_value_and_grad(kind: str, logp: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token KL estimate of ``kind`` and its derivative with respect to ``logp`` (d = logp - ref)."""
    d = logp - ref
    if kind == "kl":
        return d, torch.ones_like(d)
    if kind == "abs":
        return d.abs(), torch.sign(d)
    if kind == "mse":
        return 0.5 * d * d, d
    if kind == "low_var_kl":  # k3 = e^{-d} + d - 1 (well inside the +-20 / +-10 clamps here)
        return torch.exp(-d) + d - 1, 1 - torch.exp(-d)
    if kind == "k3+":  # value of k3, gradient of k2 (straight-through)
        return torch.exp(-d) + d - 1, d
    raise AssertionError(kind)


def truncated_is_weights(old: torch.Tensor, rollout: torch.Tensor, mask: torch.Tensor, level: str, cap: float) -> torch.Tensor:
    """min(pi_old / pi_rollout, cap) per token, per sequence (the product of the row's token ratios) or
    their geometric mean (the masked mean of the log-ratios), as verl's levels; 0 where the mask is 0."""
    out = torch.zeros_like(old)
    for i in range(old.shape[0]):
        for k in range(old.shape[1]):
            if mask[i, k] == 0:
                continue
            valid = mask[i] > 0
            if level == "token":
                ratio = math.exp(float(old[i, k]) - float(rollout[i, k]))
            elif level == "sequence":
                ratio = math.exp(float((old[i][valid] - rollout[i][valid]).sum()))
            else:
                ratio = math.exp(float((old[i][valid] - rollout[i][valid]).sum()) / int(valid.sum()))
            out[i, k] = min(ratio, cap)
    return out


def vanilla_ppo_token_losses(logp: torch.Tensor, old: torch.Tensor, adv: torch.Tensor, eps_low: float,
                             eps_high: float, clip_c: float) -> torch.Tensor:  # fmt: skip
    ratio = torch.exp(logp - old)
    ppo = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - eps_low, 1 + eps_high))
    return torch.where(adv < 0, torch.minimum(ppo, -adv * clip_c), ppo)


# ------------------------------------------------------------------------------------------------
# the update loop with free per-token log-probs
# ------------------------------------------------------------------------------------------------
class FreeLogProbs(torch.nn.Module):
    """log_probs[i, k] is a free parameter: the gradient of the loss is readable per token."""

    def __init__(self, init: torch.Tensor) -> None:
        super().__init__()
        self.logp = torch.nn.Parameter(init.clone())

    def forward_rows(self, idx: np.ndarray, rows: LossRows) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.as_tensor(idx)
        return self.logp[t], torch.zeros_like(self.logp[t])


class RecordingBackend:
    """The backend protocol without an optimizer: sums the backward-ed losses and keeps the gradients."""

    def __init__(self) -> None:
        self.total = 0.0

    def backward(self, loss: torch.Tensor, boundary: bool) -> None:
        self.total += float(loss.detach())
        loss.backward()

    def step(self) -> tuple[float, bool]:
        return 0.0, True

    def discard_gradients(self) -> None:
        raise AssertionError("no step should be discarded here")


def make_rows(seed: int, n: int = 6, width: int = 5) -> LossRows:
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(n, width, generator=g) > 0.25).float()
    mask[2] = 0.0  # an empty row
    mask[0, 0] = 1.0
    old = -0.5 - torch.rand(n, width, generator=g) * 3
    return LossRows(inputs=None, old_log_prob=old, advantages=torch.randn(n, 1, generator=g).expand(n, width) * mask,
                    loss_mask=mask)  # fmt: skip


def actor(**kw: Any) -> ActorConfig:
    base = dict(ppo_mini_batch_size=64, ppo_micro_batch_size_per_gpu=64, entropy_coeff=0.0, grad_clip=1e9,
                clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0, loss_agg_mode="token-mean",
                policy_loss=PolicyLossConfig(loss_mode="vanilla"))  # fmt: skip
    base.update(kw)
    return ActorConfig(**base)


def run_update(config: ActorConfig, rows: LossRows, logp: torch.Tensor) -> tuple[float, torch.Tensor, dict[str, float]]:
    """(total loss, d loss / d log_probs, metrics) of one on-policy mini-batch at these log-probs."""
    policy, backend = FreeLogProbs(logp), RecordingBackend()
    metrics = update_actor(policy.forward_rows, backend, config, rows)
    assert metrics["actor/optimizer_steps"] == 1.0
    return backend.total, policy.logp.grad.clone(), metrics


@pytest.mark.parametrize("kind", ["low_var_kl", "kl", "abs", "mse", "k3+"])
@pytest.mark.parametrize("micro", [64, 2])
def test_kl_loss_adds_coef_times_kl_to_the_loss_and_its_gradient(kind: str, micro: int) -> None:
    rows = make_rows(seed=1)
    g = torch.Generator().manual_seed(2)
    logp = rows.old_log_prob + 0.1 * torch.randn(rows.old_log_prob.shape, generator=g)  # the policy moved
    rows.ref_log_prob = rows.old_log_prob + 0.4 * torch.randn(rows.old_log_prob.shape, generator=g)
    coef, mask = 0.3, rows.loss_mask
    off_loss, off_grad, off_metrics = run_update(actor(ppo_micro_batch_size_per_gpu=micro), rows, logp)
    on_loss, on_grad, on_metrics = run_update(
        actor(ppo_micro_batch_size_per_gpu=micro, use_kl_loss=True, kl_loss_type=kind, kl_loss_coef=coef), rows, logp
    )  # fmt: skip
    value, grad = kl_value_and_grad(kind, logp, rows.ref_log_prob)
    kl = float((value * mask).sum() / mask.sum())
    assert abs(kl) > 1e-3  # the reference differs: the test has something to see (k1 may be negative)
    assert on_loss - off_loss == pytest.approx(coef * kl, rel=1e-5)
    torch.testing.assert_close(on_grad - off_grad, coef * grad * mask / mask.sum(), rtol=1e-5, atol=1e-7)
    assert on_metrics["actor/pg_loss"] == off_metrics["actor/pg_loss"]  # the KL is its own term
    assert "actor/kl_loss" not in off_metrics
    if micro == 64:  # one micro-batch: the metric is the mini-batch KL
        assert on_metrics["actor/kl_loss"] == pytest.approx(kl, rel=1e-5)
    else:  # as verl: the mean over micro-batches of each one's share of the mini-batch KL (token-mean)
        micros = math.ceil(len(rows) / micro)
        assert on_metrics["actor/kl_loss"] == pytest.approx(kl / micros, rel=1e-5)


def test_kl_against_an_identical_reference_is_zero_with_no_gradient() -> None:
    rows = make_rows(seed=3)
    rows.ref_log_prob = rows.old_log_prob.clone()
    off_loss, off_grad, _ = run_update(actor(), rows, rows.old_log_prob)
    on_loss, on_grad, metrics = run_update(actor(use_kl_loss=True, kl_loss_coef=0.5), rows, rows.old_log_prob)
    assert metrics["actor/kl_loss"] == 0.0
    assert on_loss == off_loss
    torch.testing.assert_close(on_grad, off_grad, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------
# rollout importance weights
# ------------------------------------------------------------------------------------------------
def mismatch(level: str, cap: float, rollout: torch.Tensor, old: torch.Tensor, mask: torch.Tensor):
    """The trainer's rollout correction (``algorithms.rollout_correction``) on its own."""
    return rollout_correction(rollout, old, mask, level, cap)


def is_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rollout, old, mask): log-ratios old - rollout on both sides of log(2), large ones at masked positions,
    a row whose mean log-ratio is above log(2) and one below, and an empty row."""
    diff = torch.tensor([
        [0.1, 2.0, -1.0, -3.0, 9.0],   # token: 1.105, 2 (capped), 0.368, 0.050; masked 9
        [1.5, 1.0, 0.5, 0.0, 0.0],     # sum 3.0, mean 1.0 > log 2: both row weights are capped
        [-0.2, -0.4, 30.0, 0.0, 0.0],  # sum -0.6, mean -0.3 (the 30 is masked)
        [5.0, 5.0, 5.0, 5.0, 5.0],     # empty row
    ])  # fmt: skip
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.float32)
    old = -1.0 - torch.arange(20, dtype=torch.float32).reshape(4, 5) / 10
    return old - diff, old, mask


@pytest.mark.parametrize("level", ["token", "sequence", "geometric"])
def test_truncated_is_weights_equal_the_formula(level: str) -> None:
    rollout, old, mask = is_case()
    weights, metrics = mismatch(level, 2.0, rollout, old, mask)
    expected = truncated_is_weights(old, rollout, mask, level, 2.0)
    torch.testing.assert_close(weights, expected, rtol=1e-6, atol=1e-7)
    assert metrics["mismatch/is_weight_mean"] == pytest.approx(float(expected.sum() / mask.sum()), rel=1e-6)
    capped = (expected == 2.0) & (mask > 0)
    assert capped.any() and ((expected < 2.0) & (mask > 0)).any()  # both regimes are exercised
    if level != "token":
        assert torch.all(weights[1, :3] == 2.0)
        row_log_ratio = -0.6 if level == "sequence" else -0.3
        assert weights[2, :2].tolist() == pytest.approx([math.exp(row_log_ratio)] * 2, rel=1e-6)
    assert torch.all(weights[3] == 0)


def test_no_is_weights_unless_asked_and_the_mismatch_is_logged() -> None:
    rollout, old, mask = is_case()
    weights, metrics = mismatch("none", 2.0, rollout, old, mask)
    assert weights is None and "mismatch/is_weight_mean" not in metrics
    valid = mask > 0
    assert metrics["mismatch/kl"] == pytest.approx(float((rollout - old)[valid].mean()), rel=1e-6)
    assert metrics["mismatch/max_ratio"] == pytest.approx(math.exp(2.0), rel=1e-6)  # masked 9 and 30 ignored


@pytest.mark.parametrize("level", ["token", "sequence", "geometric"])
def test_exactly_on_policy_weights_are_one_and_leave_the_loss_unchanged(level: str) -> None:
    rows = make_rows(seed=4)
    weights, metrics = mismatch(level, 2.0, rows.old_log_prob.clone(), rows.old_log_prob, rows.loss_mask)
    assert torch.equal(weights, rows.loss_mask) and metrics["mismatch/is_weight_mean"] == 1.0
    logp = rows.old_log_prob + 0.2 * torch.randn(rows.old_log_prob.shape, generator=torch.Generator().manual_seed(5))
    plain = run_update(actor(), rows, logp)
    rows.weights = weights
    weighted = run_update(actor(), rows, logp)
    assert weighted[0] == plain[0] and torch.equal(weighted[1], plain[1])


def test_is_weights_multiply_the_token_losses() -> None:
    rows = make_rows(seed=6)
    g = torch.Generator().manual_seed(7)
    logp = rows.old_log_prob + 0.3 * torch.randn(rows.old_log_prob.shape, generator=g)
    rows.weights = torch.rand(rows.old_log_prob.shape, generator=g) * 2 * rows.loss_mask
    loss, grad, metrics = run_update(actor(), rows, logp)
    leaf = logp.clone().requires_grad_(True)
    token = vanilla_ppo_token_losses(leaf, rows.old_log_prob, rows.advantages, 0.2, 0.28, 3.0)
    expected = (token * rows.weights * rows.loss_mask).sum() / rows.loss_mask.sum()
    expected.backward()
    assert loss == pytest.approx(float(expected), rel=1e-5)
    assert metrics["actor/pg_loss"] == pytest.approx(float(expected), rel=1e-5)
    torch.testing.assert_close(grad, leaf.grad, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------------
# through the trainer (tiny model)
# ------------------------------------------------------------------------------------------------
@register_env("kl_is_game")
class OneStepGame:
    """One step; won exactly when the seed is even, whatever the policy says."""

    name = "kl_is_game"

    def __init__(self, max_steps: int = 1) -> None:
        self.seed = 0

    def reset(self, seed: int, split: str = "train") -> Observation:
        self.seed = seed
        return Observation(f"a room, seed {seed}", task="say a", admissible_actions=["a", "b"])

    def step(self, action: Action) -> StepResult:
        won = self.seed % 2 == 0
        return StepResult(Observation("the end", task="say a"), 10.0 if won else 0.0, True, won, action.kind == "command")

    def gold_actions(self) -> list[Action]:
        return []

    def close(self) -> None:
        pass


TINY = [
    "model.path=tiny", "env.name=kl_is_game", "env.max_steps=1", "data.train_batch_size=2", "env.rollout.n=3",
    "data.max_response_length=12", "data.max_prompt_length=768", "actor.ppo_mini_batch_size=64",
    "actor.ppo_micro_batch_size_per_gpu=64", "trainer.logger=[jsonl]", "trainer.test_freq=0", "actor.lr=0.01",
    "algorithm.filter_incomplete_responses=false", "algorithm.filter_overlong_responses=false",
    "rollout.rollout_filter_ratio=1.0", "trainer.deterministic=true", "trainer.total_training_steps=1",
    "trainer.run_name=run",
]  # fmt: skip
"""One step of grpo; one mini-batch and one micro-batch (the 6 rows), so the logged KL is the batch's and
the first forward of the update is at the weights that produced the old log-probs."""


def tiny_trainer(tmp_path: Path, *extra: str) -> Trainer:
    return Trainer(load_config("grpo", [*TINY, f"trainer.output_dir={tmp_path}", *extra]), console=False)


def spy_update(monkeypatch: pytest.MonkeyPatch) -> list[tuple[LossRows, dict[str, float]]]:
    """Record the on-policy rows the trainer passes to update_actor, with the metrics it returns."""
    seen: list[tuple[LossRows, dict[str, float]]] = []
    real = step_module.update_actor

    def spy(forward, backend, config, on_policy, *args, **kwargs):
        metrics = real(forward, backend, config, on_policy, *args, **kwargs)
        seen.append((on_policy, metrics))
        return metrics

    monkeypatch.setattr(step_module, "update_actor", spy)
    return seen


def plain_log_probs(model: torch.nn.Module, batch: Any, temperature: float) -> torch.Tensor:
    """Log-probs of the response tokens from the model's full logits (no fused head)."""
    mask = batch.attention_mask
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0),
                       use_cache=False).logits.float()  # fmt: skip
    p, width = batch.prompt_width, batch.input_ids.shape[1] - batch.prompt_width
    logp = torch.log_softmax(logits[:, p - 1 : p - 1 + width] / temperature, dim=-1)
    return logp.gather(-1, batch.responses.unsqueeze(-1)).squeeze(-1) * batch.response_attention


def test_trainer_kl_to_an_identical_reference_is_zero_and_logged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = spy_update(monkeypatch)
    trainer = tiny_trainer(tmp_path, "actor.use_kl_loss=true", "actor.kl_loss_coef=0.5", "trainer.logger=[jsonl,tensorboard]")
    ref_before = {k: v.clone() for k, v in trainer.ref_policy.state_dict().items()}
    policy_before = {k: v.clone() for k, v in trainer.backend.hf_model.state_dict().items()}
    assert all(torch.equal(policy_before[k], v) for k, v in ref_before.items() if k in policy_before)
    trainer.fit()
    ((rows, _),) = seen
    # exactly on-policy: the old log-probs are the update's first forward (actor.recompute_old_log_prob=auto)
    assert rows.old_log_prob is None and rows.forward_log_prob is not None
    assert rows.ref_log_prob is not None and rows.ref_log_prob.shape == rows.forward_log_prob.shape
    torch.testing.assert_close(rows.ref_log_prob, rows.forward_log_prob, rtol=0, atol=1e-6)
    (record,) = read_metrics(tmp_path / "run")
    assert record["step"] == 1 and record["actor/kl_loss"] == pytest.approx(0.0, abs=1e-6)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("actor/kl_loss")] == [(1, pytest.approx(record["actor/kl_loss"], abs=1e-7))]
    for key in ("episode/success_rate", "actor/pg_loss", "time/step"):  # the same numbers in both sinks
        assert [(e.step, e.value) for e in events.Scalars(key)] == [(1, pytest.approx(record[key], rel=1e-6))]
    # the reference stays frozen while the policy learns
    assert all(torch.equal(v, ref_before[k]) for k, v in trainer.ref_policy.state_dict().items())
    after = trainer.backend.hf_model.state_dict()
    assert any(not torch.equal(after[k], v) for k, v in policy_before.items())


def test_trainer_kl_to_a_perturbed_reference_matches_the_formula(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = spy_update(monkeypatch)
    trainer = tiny_trainer(tmp_path, "actor.use_kl_loss=true", "actor.kl_loss_coef=0.5", "actor.kl_loss_type=low_var_kl")
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in trainer.ref_policy.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    try:
        metrics = trainer.train_step()
    finally:
        trainer.close()
    ((rows, update_metrics),) = seen
    mask = rows.loss_mask
    # the reference log-probs are the perturbed model's (read from its full logits here)
    expected_ref = plain_log_probs(trainer.ref_policy.model, rows.inputs, trainer.config.rollout.temperature)
    torch.testing.assert_close(rows.ref_log_prob * mask, expected_ref * mask, rtol=1e-4, atol=1e-4)
    # the first forward of the update is at the old weights: log_prob = old_log_prob (exactly on-policy, the
    # update's own first forward is the old log-prob: actor.recompute_old_log_prob=auto)
    assert rows.old_log_prob is None and rows.forward_log_prob is not None
    d = rows.forward_log_prob - rows.ref_log_prob
    k3 = (torch.exp(-d) + d - 1) * mask
    assert float(k3.max()) < 10 and float(d.abs().max()) < 20  # inside low_var_kl's clamps
    kl = float(k3.sum() / mask.sum())
    assert kl > 1e-3
    assert metrics["actor/kl_loss"] == update_metrics["actor/kl_loss"] == pytest.approx(kl, rel=1e-4)


class ScriptedEngine:
    """Always answers ``<action>a</action>``; behaviour log-probs -30 and 0 alternating, so pi_old / pi_rollout
    is far above any cap on even tokens (e^~25) and far below it on odd ones (the tiny model's ~e^-5)."""

    name = "scripted"

    def __init__(self, tokenizer: Any) -> None:
        ids = list(tokenizer("<action>a</action>", add_special_tokens=False)["input_ids"])
        self.ids = [*ids, tokenizer.eos_token_id]
        self.logp = [-30.0 if k % 2 == 0 else 0.0 for k in range(len(self.ids))]

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Generation]:
        n = min(len(self.ids), params.max_new_tokens)
        return [Generation(self.ids[:n], self.logp[:n], "stop" if n == len(self.ids) else "length") for _ in prompts]

    def load_weights(self, named_tensors: Any) -> None:
        for _ in named_tensors:
            pass

    def close(self) -> None:
        pass


@pytest.mark.parametrize("level", ["token", "sequence", "geometric"])
def test_trainer_is_weights_from_the_engine_log_probs(level: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = spy_update(monkeypatch)
    mismatches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def spy_mismatch(rollout_logp, old_logp, mask, mode, threshold):
        mismatches.append((rollout_logp.clone(), old_logp.clone(), mask.clone()))
        return rollout_correction(rollout_logp, old_logp, mask, mode, threshold)

    monkeypatch.setattr(step_module, "rollout_correction", spy_mismatch)
    trainer = tiny_trainer(tmp_path, f"rollout.rollout_is={level}", "rollout.rollout_is_threshold=2.0",
                           "data.max_response_length=32")  # fmt: skip
    engine = ScriptedEngine(trainer.tokenizer)
    trainer.agent_loop.engine = engine
    try:
        metrics = trainer.train_step()
    finally:
        trainer.close()
    ((rollout, old, mask),) = mismatches
    ((rows, _),) = seen
    valid = mask > 0
    assert valid.sum() == len(rows) * len(engine.ids)  # every sampled token, eos included
    # the behaviour log-probs are the engine's, token for token
    assert all(row[m > 0].tolist() == engine.logp for row, m in zip(rollout, mask))
    torch.testing.assert_close(rows.old_log_prob, old, rtol=0, atol=0)
    expected = truncated_is_weights(old, rollout, mask, level, 2.0)
    torch.testing.assert_close(rows.weights, expected, rtol=1e-5, atol=1e-6)
    assert metrics["mismatch/is_weight_mean"] == pytest.approx(float(expected.sum() / mask.sum()), rel=1e-5)
    if level == "token":
        assert (rows.weights[valid] == 2.0).any() and (rows.weights[valid] < 0.5).any()
