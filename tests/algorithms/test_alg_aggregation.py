"""Every loss-aggregation entry point gives verl 0.9's value, computed here by hand.

The one definition is ``spear_kernels.agg_loss`` / ``spear_kernels.agg_scale`` (per-token weights); the
engine's ``losses.agg_loss``, its kernel path (``kernel_dispatch``), the fused trainer path (which sums
``agg_scale`` weights), the kernels' ``policy_loss`` and their reference all go through it. Checked for
every mode with an empty (all-masked) row, with the micro-batch's own counts and with global counts
(``dp_size`` ranks), and for the older verl of the official SPEAR code (``legacy_global_batch_info``).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

import spear_kernels
from spear_engine.algorithms import losses
from spear_engine.algorithms.kernel_dispatch import BACKEND_ENV
from spear_kernels.reference import policy_loss_ref

# Row 0: tokens 1, 2 valid (S = 3, n = 2); row 1: all masked; row 2: all four valid (S = 11.5, n = 4).
LOSS = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0], [-1.0, 10.0, 2.0, 0.5]])
MASK = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
GLOBAL = {"dp_size": 2, "batch_num_tokens": 10, "global_batch_size": 5, "loss_scale_factor": 8.0}

# verl 0.9 by hand. Local: N = 6 valid tokens, G = 2 non-empty rows, T = 4.
# Global: N = 10, G = 5, times dp = 2, loss_scale_factor 8.
EXPECTED = {
    ("token-mean", "local"): 14.5 / 6,
    ("token-sum", "local"): 14.5,
    ("seq-mean-token-sum", "local"): 14.5 / 2,
    ("seq-mean-token-sum-norm", "local"): 14.5 / 2 / 4,
    ("seq-mean-token-mean", "local"): (3 / 2 + 11.5 / 4) / 2,
    ("token-mean", "global"): 14.5 / 10 * 2,
    ("token-sum", "global"): 14.5 * 2,
    ("seq-mean-token-sum", "global"): 14.5 / 5 * 2,
    ("seq-mean-token-sum-norm", "global"): 14.5 / 5 * 2 / 8,
    ("seq-mean-token-mean", "global"): (3 / 2 + 11.5 / 4) / 5 * 2,
}
# The older verl (official SPEAR code): mean over all B = 3 rows, sum-norm not divided by rows.
LEGACY = {
    "token-mean": 14.5 / 6,
    "token-sum": 14.5,
    "seq-mean-token-sum": 14.5 / 3,
    "seq-mean-token-sum-norm": 14.5 / 4,
    "seq-mean-token-mean": (3 / 2 + 11.5 / 4) / 3,
}


def _gpg(backend_env: str, info: dict, mode: str, monkeypatch) -> float:
    """The engine's verl-style GPG loss, -A·logp with A = -1: the aggregation of logp = LOSS."""
    monkeypatch.setenv(BACKEND_ENV, backend_env)
    config = SimpleNamespace(global_batch_info=info)
    loss, _ = losses.compute_policy_loss_gpg(LOSS, LOSS.clone(), -torch.ones_like(LOSS), MASK, mode, config)
    return loss.item()


def entry_points(mode: str, info: dict, monkeypatch) -> dict[str, float]:
    minus_one = -torch.ones_like(LOSS)
    return {
        "spear_kernels.agg_loss": spear_kernels.agg_loss(LOSS, MASK, mode, **info).item(),
        "losses.agg_loss": losses.agg_loss(LOSS, MASK, mode, **info).item(),
        "bool mask": losses.agg_loss(LOSS, MASK.bool(), mode, **info).item(),
        "sum of agg_scale weights": (spear_kernels.agg_scale(MASK, mode, **info) * LOSS).sum().item(),
        "policy_loss torch": spear_kernels.policy_loss(
            LOSS, LOSS, minus_one, MASK, "gpg", mode, **info, backend="torch"
        ).loss.item(),
        "policy_loss triton": spear_kernels.policy_loss(
            LOSS, LOSS, minus_one, MASK, "gpg", mode, **info, backend="triton"
        ).loss.item(),
        "policy_loss_ref": policy_loss_ref(LOSS, LOSS, minus_one, MASK, "gpg", mode, **info)[0].item(),
        "engine torch path": _gpg("torch", info, mode, monkeypatch),
        "engine kernel path": _gpg("triton", info, mode, monkeypatch),
    }


@pytest.mark.parametrize("counts", ["local", "global"])
@pytest.mark.parametrize("mode", spear_kernels.AGG_MODES)
def test_every_entry_point_gives_the_verl_value(mode: str, counts: str, monkeypatch) -> None:
    info = {} if counts == "local" else GLOBAL
    expected = EXPECTED[(mode, counts)]
    for name, value in entry_points(mode, info, monkeypatch).items():
        assert value == pytest.approx(expected, rel=1e-6), name


@pytest.mark.parametrize("mode", spear_kernels.AGG_MODES)
def test_legacy_batch_info_gives_the_older_verl_value(mode: str, monkeypatch) -> None:
    info = losses.legacy_global_batch_info(mode, MASK)
    assert losses.legacy_global_batch_info is spear_kernels.legacy_global_batch_info
    for name, value in entry_points(mode, info, monkeypatch).items():
        assert value == pytest.approx(LEGACY[mode], rel=1e-6), name


@pytest.mark.parametrize("mode", spear_kernels.AGG_MODES)
def test_a_mask_without_valid_tokens(mode: str) -> None:
    """verl 0.9 divides 0 by 0 there (NaN; token-sum gives 0); the per-token weights are all 0."""
    empty = torch.zeros_like(MASK)
    value = spear_kernels.agg_loss(LOSS, empty, mode).item()
    assert value == 0.0 if mode == "token-sum" else math.isnan(value)
    assert torch.equal(spear_kernels.agg_scale(empty, mode), torch.zeros_like(MASK))
    assert spear_kernels.policy_loss(LOSS, LOSS, -torch.ones_like(LOSS), empty, "gpg", mode).loss.item() == 0.0


def test_dp_size_needs_the_global_counts() -> None:
    for mode in ("token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm", "seq-mean-token-mean"):
        with pytest.raises(ValueError, match="dp_size > 1"):
            spear_kernels.agg_loss(LOSS, MASK, mode, dp_size=2)
        with pytest.raises(ValueError, match="dp_size > 1"):
            spear_kernels.agg_scale(MASK, mode, dp_size=2)
    for fn in (lambda: spear_kernels.agg_loss(LOSS, MASK, "seq-sum"), lambda: spear_kernels.agg_scale(MASK, "x")):
        with pytest.raises(ValueError, match="Invalid loss_agg_mode"):
            fn()


def test_one_definition() -> None:
    assert losses.agg_loss is spear_kernels.agg_loss
    assert set(losses.LOSS_AGG_MODES) == set(spear_kernels.AGG_MODES)
