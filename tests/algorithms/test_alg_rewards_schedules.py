"""rewards and schedules: tool-call bonus, score placement, invalid-action penalty, c(t)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spear_engine.algorithms.rewards import (
    apply_invalid_action_penalty,
    compute_step_scores,
    last_token_index,
    place_scores,
    toolcall_bonus,
    toolcall_counts,
)
from spear_engine.algorithms.schedules import replay_coefficient, toolcall_bonus_factor


# --------------------------------------------------------------------------------------------
# schedules
# --------------------------------------------------------------------------------------------
def test_replay_coefficient_by_hand():
    assert replay_coefficient(200, 1.0, 200) == pytest.approx(1.0)
    assert replay_coefficient(100, 1.0, 200) == pytest.approx(0.5)
    assert replay_coefficient(50, 2.0, 200) == pytest.approx(2.0 * (1 - math.cos(math.pi / 4)) / 2)
    assert replay_coefficient(1, 1.0, 200) == pytest.approx((1 - math.cos(math.pi / 200)) / 2)
    assert replay_coefficient(1, 1.0, 200) < 1e-4
    assert replay_coefficient(201, 0.001, 200) == 0.001
    assert replay_coefficient(10_000, 1.0, 200) == 1.0
    with pytest.raises(ValueError):
        replay_coefficient(1, 1.0, 0)


@settings(max_examples=50, deadline=None)
@given(step=st.integers(0, 400), horizon=st.integers(1, 300), coef=st.floats(0, 10))
def test_property_replay_coefficient_monotone_and_bounded(step, horizon, coef):
    c0, c1 = replay_coefficient(step, coef, horizon), replay_coefficient(step + 1, coef, horizon)
    assert -1e-12 <= c0 <= coef + 1e-12
    assert c1 >= c0 - 1e-12


def test_toolcall_factor_by_hand():
    assert toolcall_bonus_factor(0, "cosine", 200) == 1.0  # validation before training
    assert toolcall_bonus_factor(100, "cosine", 200) == pytest.approx(0.5)
    assert toolcall_bonus_factor(200, "cosine", 200) == pytest.approx(0.0, abs=1e-15)
    assert toolcall_bonus_factor(200, "cosine", 200) >= 0.0  # the official max(0, .)
    assert toolcall_bonus_factor(201, "cosine", 200) == 0.0
    assert toolcall_bonus_factor(50, "constant", 200) == 1.0
    assert toolcall_bonus_factor(5000, "constant", 200) == 1.0
    assert toolcall_bonus_factor(50, "none", 200) == 0.0
    for bad in ("linear", "Cosine", ""):
        with pytest.raises(ValueError):
            toolcall_bonus_factor(1, bad, 200)
    with pytest.raises(ValueError):
        toolcall_bonus_factor(-1, "cosine", 200)


@settings(max_examples=50, deadline=None)
@given(step=st.integers(0, 400), horizon=st.integers(1, 300))
def test_property_toolcall_factor_decays(step, horizon):
    f0, f1 = (
        toolcall_bonus_factor(step, "cosine", horizon),
        toolcall_bonus_factor(step + 1, "cosine", horizon),
    )
    assert 0.0 <= f1 <= f0 <= 1.0


# --------------------------------------------------------------------------------------------
# tool-call bonus
# --------------------------------------------------------------------------------------------
def test_toolcall_bonus_by_hand():
    n = [0, 3, 10, 15]
    assert toolcall_bonus(n, 7, "none").tolist() == [0.0, 0.0, 0.0, 0.0]
    assert toolcall_bonus(n, 7, "constant").tolist() == pytest.approx([0.0, 0.3, 1.0, 1.0])
    assert toolcall_bonus(n, 100, "cosine", max_steps=200).tolist() == pytest.approx([0.0, 0.15, 0.5, 0.5])
    assert toolcall_bonus(n, 201, "cosine", max_steps=200).tolist() == [0.0, 0.0, 0.0, 0.0]
    assert toolcall_bonus(n, 1, "constant", per_call=0.25, cap=0.6).tolist() == pytest.approx(
        [0.0, 0.6, 0.6, 0.6]
    )
    with pytest.raises(ValueError):
        toolcall_bonus(n, 1, "linear")


def test_toolcall_counts_rules():
    assert toolcall_counts("env_steps", episode_lengths=[5, 2]).tolist() == [5, 2]
    assert toolcall_counts("tool_calls", episode_lengths=[5, 2], valid_tool_calls=[3, 0]).tolist() == [3, 0]
    with pytest.raises(ValueError):
        toolcall_counts("tool_calls", episode_lengths=[5, 2])
    with pytest.raises(ValueError):
        toolcall_counts("turns", episode_lengths=[5, 2])


# --------------------------------------------------------------------------------------------
# score placement
# --------------------------------------------------------------------------------------------
MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1], [1, 0, 1, 0]])


def test_last_token_index_and_placement():
    # row 2 is empty: the official index valid_len - 1 = -1 is the last column
    assert last_token_index(MASK).tolist() == [2, 0, 3, 3, 2]
    placed = place_scores([1.0, 2.0, 3.0, 4.0, 5.0], MASK)
    assert placed.dtype == torch.float32
    assert placed.sum(-1).tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert placed[0].tolist() == [0.0, 0.0, 1.0, 0.0]
    assert placed[2].tolist() == [0.0, 0.0, 0.0, 3.0]


def test_compute_step_scores_env_steps_vs_tool_calls():
    mask = MASK[:3]
    episode_rewards = [10.0, 0.0, 0.0]
    kwargs = {"episode_lengths": [12, 4, 4], "valid_tool_calls": [9, 1, 0]}
    official = compute_step_scores(episode_rewards, mask, 100, "cosine", 200, "env_steps", **kwargs)
    assert official.sum(-1).tolist() == pytest.approx([10.5, 0.2, 0.2])
    paper = compute_step_scores(episode_rewards, mask, 100, "cosine", 200, "tool_calls", **kwargs)
    assert paper.sum(-1).tolist() == pytest.approx([10.45, 0.05, 0.0])
    plain = compute_step_scores(episode_rewards, mask, 100)
    assert plain.sum(-1).tolist() == [10.0, 0.0, 0.0]
    assert official[0, 2].item() == pytest.approx(10.5)


def test_invalid_action_penalty():
    scores = place_scores([1.0, 0.5, 0.0, 2.0, 1.0], MASK)
    step_rewards = torch.tensor([3.0, 2.0, 1.0, 0.0, 0.5])
    before = scores.clone()
    valid = np.array([True, False, False, True, False])
    new_scores, new_steps, metrics = apply_invalid_action_penalty(scores, MASK, valid, 0.1, step_rewards)
    assert torch.equal(scores, before)  # inputs untouched
    assert new_scores.sum(-1).tolist() == pytest.approx([1.0, 0.4, -0.1, 2.0, 0.9])
    assert new_scores[1, 0].item() == pytest.approx(0.4) and new_scores[2, 3].item() == pytest.approx(-0.1)
    assert new_steps.tolist() == pytest.approx([3.0, 1.9, 0.9, 0.0, 0.4])
    assert metrics == {"valid_action_ratio": pytest.approx(0.4)}
    no_steps = apply_invalid_action_penalty(scores, MASK, valid)
    assert no_steps[1] is None and torch.equal(no_steps[0], new_scores)
