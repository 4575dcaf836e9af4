"""The config-driven stages and `spear demo` end to end on the recorded batch, for every preset."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from spear_engine.algorithms.schedules import replay_coefficient
from spear_engine.algorithms.self_imitation import MASK_ATTENTION, MASK_RESPONSE
from spear_engine.cli import main
from spear_engine.config_loading import load_config
from spear_engine.data import RolloutBatch, load_episodes
from spear_engine.demo import DEFAULT_RECORDING, run
from spear_engine.pipeline import compute_advantages, score_and_filter, sil_batch


@pytest.fixture(scope="module")
def episodes():
    rollouts, _ = load_episodes(DEFAULT_RECORDING)
    return rollouts[0]


def test_recording_round_trips_into_a_step_batch(episodes) -> None:
    batch = RolloutBatch.from_episodes(episodes)
    assert len(batch) == sum(e.length for e in episodes)
    first = episodes[0].turns[0]
    n = len(first.response_ids)
    assert batch.responses[0, :n].tolist() == first.response_ids
    assert batch.response_attention_mask[0].sum().item() == n
    p = len(first.prompt_ids)
    assert batch.prompts[0, -p:].tolist() == first.prompt_ids and batch.prompt_mask[0, :-p].sum() == 0


def test_filters_apply_only_where_configured(episodes) -> None:
    batch = RolloutBatch.from_episodes(episodes)
    official_drbot = load_config("drbot", ["algorithm.filters_without_replay=false"])
    scored, metrics = score_and_filter(official_drbot, batch, step=1)
    assert metrics == {} and torch.equal(scored.response_mask, batch.response_attention_mask.float())
    scored, metrics = score_and_filter(load_config("drbot"), batch, step=1)
    flagged = (scored.response_mask.sum(-1) == 0) & (batch.response_attention_mask.sum(-1) > 0)
    assert flagged.sum() > 0 and metrics["incomplete_responses"] > 0
    texts = [batch.response_texts[i] for i in np.flatnonzero(flagged.numpy())]
    assert all("<action>" not in t or "\ufffd" in t or len(t) > 400 for t in texts)


def test_tool_bonus_follows_the_count_rule(episodes) -> None:
    batch = RolloutBatch.from_episodes(episodes)
    for rule, counts in (("env_steps", batch.episode_lengths), ("tool_calls", batch.episode_tool_calls)):
        config = load_config("spear", [f"algorithm.toolcall_count={rule}"])
        scored, _ = score_and_filter(config, batch, step=1)
        factor = (1 + math.cos(math.pi / 200)) / 2
        expected = batch.episode_rewards + np.minimum(1.0, 0.1 * counts) * factor
        np.testing.assert_allclose(scored.token_level_scores.sum(-1).numpy(), expected, rtol=1e-6)


def test_sil_batch_flags_prompt_response_and_filtered_tokens(episodes) -> None:
    config = load_config("spear")
    scored, _ = score_and_filter(config, RolloutBatch.from_episodes(episodes), step=1)
    advantages, _ = compute_advantages(config, scored)
    rows = sil_batch(scored, advantages, torch.zeros(scored.response_mask.shape))
    starts = np.concatenate([[0], np.cumsum(rows.lengths)[:-1]])
    for i in range(len(rows)):
        flags = rows.mask[starts[i] : starts[i] + rows.lengths[i]]
        n_prompt = int(scored.batch.prompt_mask[i].sum())
        assert (flags[:n_prompt] == 0).all() and (flags[n_prompt:] & MASK_ATTENTION).all()
        filtered = scored.response_mask[i].sum() == 0
        assert bool((flags[n_prompt:] & MASK_RESPONSE).any()) == (not filtered)
    np.testing.assert_allclose(rows.scores, advantages.token_level_rewards.sum(-1).numpy())


@pytest.mark.parametrize("preset", ["grpo", "drbot", "gigpo", "spear", "gigpo-spear", "spear-official"])
def test_demo_runs_every_preset_with_finite_metrics(preset: str) -> None:
    overrides = ["replay.trajectory_buffer_size=8", "actor.lr=0.01"] if preset == "spear-official" else []
    history = run(load_config(preset, overrides), steps=2, seed=0)
    assert len(history) == 2
    for metrics in history:
        assert all(math.isfinite(v) for v in metrics.values()), metrics
        assert "actor/pg_loss" in metrics and "episode/success_rate" in metrics
    config = load_config(preset, overrides)
    for step, metrics in enumerate(history, start=1):
        expected = replay_coefficient(step, 1.0, config.replay.max_replay_loss_steps)
        assert metrics["schedule/replay_coef"] == (expected if config.replay.enable_trajectory_replay else 0.0)
    replayed = sum(m.get("replay/drawn_rows", 0.0) for m in history)
    if config.replay.enable_trajectory_replay:
        assert replayed > 0 and any("actor/pg_loss_replay" in m for m in history)
    else:
        assert replayed == 0 and not any("actor/pg_loss_replay" in m for m in history)


def test_cli_demo_and_user_errors(capsys) -> None:
    assert main(["demo", "--steps", "1", "--preset", "grpo"]) == 0
    assert "pg_loss" in capsys.readouterr().out
    assert main(["demo", "--preset", "speer"]) == 2
    assert "unknown preset 'speer'. Did you mean 'spear'" in capsys.readouterr().err
    assert main(["demo", "actor.clip_ratio_hihg=1"]) == 2
    err = capsys.readouterr().err
    assert "Did you mean 'actor.clip_ratio_high'" in err and "Traceback" not in err
    assert main(["demo", "--steps", "0"]) == 2
    assert main(["presets"]) == 0 and "spear-official" in capsys.readouterr().out
    assert main(["presets", "--keys"]) == 0
    assert "replay.replay_trigger = 'when_full_then_flush'" in capsys.readouterr().out
