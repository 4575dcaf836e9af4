"""Parity with verl 0.9.1 from the stored fixture (scripts/make_verl_fixtures.py wrote it with verl).

Same inputs -> same values and gradients w.r.t. ``log_prob`` (fp32 rtol 1e-6 / atol 1e-7: the ops
are verl's, but the fixture may come from a CPU whose vectorised reductions round differently; the
live test compares bit for bit on one machine; reductions over the vocabulary (entropy, log-probs) at
1e-5 of their scale, since an AVX2-only CPU rounds them ~2e-6 away from the fixture's AVX-512 values),
metrics dicts (keys and values), output dtypes.
Clip-Cov's random draw is reproduced by seeding the global RNG as the fixture did (torch's
``randperm`` stream is assumed unchanged since the fixture's torch version, stored in its meta).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from spear_engine.algorithms import losses as L
from spear_engine.algorithms import token_ops as F
from spear_engine.algorithms.advantages import compute_grpo_outcome_advantage

FIXTURE = Path(__file__).parent / "fixtures" / "verl091.pt"
pytestmark = pytest.mark.skipif(not FIXTURE.exists(), reason=f"fixture {FIXTURE} missing")


@pytest.fixture(scope="module")
def fixture():
    data = torch.load(FIXTURE, weights_only=True)
    assert data["meta"]["verl_version"] == "0.9.1"
    return data


def _config(case):
    """The fixture's config (an OmegaConf DictConfig in verl) as a plain SimpleNamespace here."""
    return SimpleNamespace(
        clip_ratio=0.2,
        clip_ratio_low=0.2,
        clip_ratio_high=0.28,
        clip_ratio_c=case["clip_ratio_c"],
        global_batch_info=case["batch_info"],
        policy_loss=SimpleNamespace(loss_mode=case["loss_mode"], **case["policy_loss"]),
    )


def _same(ours: torch.Tensor, ref: torch.Tensor, rtol=1e-6, atol=1e-7, msg: str = "") -> None:
    assert ours.dtype == ref.dtype and ours.shape == ref.shape, msg
    torch.testing.assert_close(ours, ref, rtol=rtol, atol=atol, equal_nan=True, msg=msg or None)


def test_fixture_covers_what_it_should(fixture):
    cases = fixture["policy_loss"]
    assert {c["loss_mode"] for c in cases} == {"vanilla", "clip_cov", "kl_cov", "gpg"}
    assert {c["loss_agg_mode"] for c in cases} == set(L.LOSS_AGG_MODES)
    assert {c["inputs"]["response_mask"].dtype for c in cases} == {torch.bool, torch.float32, torch.float64}
    assert any(c["metrics"].get("actor/pg_clipfrac_lower", 0) > 0 for c in cases)  # dual clip active
    assert any(c["loss_mode"] == "clip_cov" and c["metrics"]["actor/pg_clipfrac"] > 0 for c in cases)
    assert any(not c["inputs"]["response_mask"].any() for c in cases)  # fully masked batches
    assert FIXTURE.stat().st_size < 2 * 1024 * 1024


def test_policy_losses(fixture):
    for case in fixture["policy_loss"]:
        inputs = case["inputs"]
        log_prob = inputs["log_prob"].clone().requires_grad_(True)
        torch.manual_seed(case["seed"])
        loss, metrics = L.get_policy_loss_fn(case["loss_mode"])(
            inputs["old_log_prob"],
            log_prob,
            inputs["advantages"],
            inputs["response_mask"],
            loss_agg_mode=case["loss_agg_mode"],
            config=_config(case),
            rollout_is_weights=case["weights"],
        )
        loss.backward()
        label = (
            f"{case['loss_mode']} {case['loss_agg_mode']} {case['batch_info']} seed={case['seed']} "
            f"(fixture torch {fixture['meta']['torch_version']}, here {torch.__version__})"
        )
        assert str(loss.dtype) == case["dtype"], label
        _same(loss.detach(), case["loss"], msg=label)
        _same(log_prob.grad, case["grad"], msg=label)
        assert metrics.keys() == case["metrics"].keys(), label
        for key, value in metrics.items():
            assert value == pytest.approx(case["metrics"][key], rel=1e-6, abs=1e-7, nan_ok=True), (label, key)


def test_agg_loss(fixture):
    for case in fixture["agg_loss"]:
        _same(L.agg_loss(case["loss_mat"], case["mask"], case["mode"], **case["batch_info"]), case["out"])


def test_kl_penalty(fixture):
    for case in fixture["kl_penalty"]:
        x = case["logprob"].clone().requires_grad_(True)
        value = L.kl_penalty(x, case["ref"], case["kind"])
        (value * case["upstream"]).sum().backward()
        _same(value.detach(), case["value"])
        _same(x.grad, case["grad"])


def test_entropy_and_logprobs(fixture):
    tok = fixture["token"]
    logits, labels, upstream = tok["logits"], tok["labels"], tok["upstream"]
    for fn, value_key, grad_key in (
        (F.entropy_from_logits, "entropy", "entropy_grad"),
        (lambda x: F.logprobs_from_logits(x, labels), "logprobs", "logprobs_grad"),
    ):
        x = logits.clone().requires_grad_(True)
        out = fn(x)
        (out * upstream).sum().backward()
        # values: a reduction over the vocabulary in fp32, whose rounding follows the CPU's vector width (the
        # fixture's AVX-512 vs an AVX2-only CPU differ by ~2e-6 relative), so 1e-5 of the largest value
        _same(out.detach(), tok[value_key], rtol=1e-5, atol=1e-6 * tok[value_key].abs().max().item())
        # hand-written backward vs verl's autograd graph: both are ~1e-6 (relative to max |grad|)
        # away from the float64 gradient, so they are compared at that scale
        scale = tok[grad_key].abs().max().item()
        _same(x.grad, tok[grad_key], rtol=1e-5, atol=1e-6 * scale)
    # bf16 logits: verl's math runs in bf16, ours in fp32 then rounds: same dtype, bf16-level agreement
    bf16 = logits.to(torch.bfloat16)
    for ours, key in (
        (F.entropy_from_logits(bf16), "entropy_bf16"),
        (F.logprobs_from_logits(bf16, labels), "logprobs_bf16"),
    ):
        _same(ours, tok[key], rtol=2e-2, atol=5e-2)
    for mode, value in tok["entropy_loss"].items():  # entropies aggregated: the same vocabulary reductions
        _same(L.compute_entropy_loss(logits, tok["mask"], mode), value, rtol=1e-5, atol=1e-6 * value.abs().item())


def test_masked_reductions(fixture):
    m = fixture["token"]["masked"]
    values, mask = m["values"], m["mask"]
    _same(F.masked_sum(values, mask), m["sum"])
    _same(F.masked_sum(values, mask.float(), axis=-1), m["sum_axis"])
    _same(F.masked_mean(values, mask), m["mean"])
    _same(F.masked_mean(values, mask, axis=0), m["mean_axis"])
    _same(F.masked_var(values, mask), m["var"])
    _same(F.masked_var(values, mask.float(), unbiased=False), m["var_biased"])


def test_grpo(fixture):
    for case in fixture["grpo"]:
        index = np.array(case["uids"], dtype=object)
        adv, ret = compute_grpo_outcome_advantage(
            case["rewards"], case["mask"], index, norm_adv_by_std_in_grpo=case["norm"]
        )
        _same(adv, case["advantages"])
        _same(ret, case["returns"])
