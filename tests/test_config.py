"""Presets load and validate; overrides parse; bad configs fail with the promised messages."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from spear_engine.config import SpearConfig
from spear_engine.config_loading import (
    ConfigError,
    all_config_keys,
    config_to_yaml,
    load_config,
    load_preset_dict,
    parse_overrides,
    validate_config,
)

PRESETS = ["grpo", "drbot", "spear", "gigpo", "gigpo-spear", "spear-official"]
README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_loads_and_round_trips(name: str) -> None:
    config = load_config(name)
    assert config.preset == name
    again = validate_config(config.model_dump())
    assert again == config


def test_spear_official_matches_the_official_alfworld_script() -> None:
    """The official run_alfworld_spear.sh plus the yaml defaults it keeps (docs/algorithm.md, 'Official run
    settings')."""
    c = load_config("spear-official")
    assert (c.actor.clip_ratio_low, c.actor.clip_ratio_high, c.actor.clip_ratio_c) == (0.2, 0.28, 10.0)
    assert c.actor.loss_agg_mode == "seq-mean-token-sum-norm" and c.actor.legacy_agg_loss
    assert c.actor.policy_loss.loss_mode == "clip_cov"
    pl = c.actor.policy_loss
    assert (pl.clip_cov_ratio, pl.clip_cov_lb, pl.clip_cov_ub) == (2e-4, 1.0, 5.0)
    assert (pl.clip_cov_ratio_replay, pl.clip_cov_lb_replay, pl.clip_cov_ub_replay) == (0.02, 2.0, 60.0)
    assert c.actor.entropy_coeff == 0.001 and not c.actor.use_kl_loss and not c.actor.use_filtered_response_mask
    assert (c.actor.ppo_mini_batch_size, c.actor.ppo_micro_batch_size_per_gpu, c.actor.lr) == (1024, 8, 1e-6)
    r = c.replay
    assert r.enable_trajectory_replay and r.trajectory_buffer_size == 2048
    assert (r.trajectory_tolerate_steps, r.tolerate_steps_cap, r.staleness_anchor) == (5, 10, "newest_row")
    assert (r.replay_loss_coef, r.max_replay_loss_steps, r.weight_decay_trajectory_replay) == (1.0, 200, -1.0)
    assert (r.baseline_buffer_size, r.baseline_unit, r.baseline_eviction) == (10240, "group_mean", "step_entries")
    assert (r.admission_threshold, r.admission_level, r.recalibration_keep) == (0.0, "step", "nonnegative")
    assert (r.replay_trigger, r.full_factor, r.replay_update, r.replay_mask) == (
        "when_full_then_flush",
        1.5,
        "sequential",
        "attention",
    )
    a = c.algorithm
    assert (a.use_toolcall_reward, a.max_toolcall_steps, a.toolcall_count) == ("cosine", 200, "env_steps")
    assert not a.norm_adv_by_std_in_grpo and a.invalid_action_penalty_coef == 0.1
    assert all(
        [
            a.filter_overlong_responses,
            a.filter_incomplete_responses,
            a.filter_repetitive_responses,
            a.filter_unreadable_responses,
        ]
    )
    assert (c.rollout.rollout_filter_ratio, c.rollout.rollout_filter_type) == (0.75, "std")
    assert c.rollout.rollout_filter_pow2_subsample and c.data.pad_batch_by_duplication
    assert (c.data.train_batch_size, c.env.rollout.n, c.env.max_steps) == (32, 8, 50)
    assert (c.data.max_prompt_length, c.data.max_response_length) == (2048, 512)
    assert (c.trainer.total_training_steps, c.rollout.val_temperature) == (200, 0.4)


def test_baselines_match_the_official_baseline_scripts() -> None:
    g = load_config("grpo")
    assert (g.actor.clip_ratio_low, g.actor.clip_ratio_high) == (0.2, 0.2)
    assert g.algorithm.norm_adv_by_std_in_grpo and g.actor.loss_agg_mode == "token-mean"
    assert g.actor.policy_loss.loss_mode == "vanilla" and not g.replay.enable_trajectory_replay
    assert g.algorithm.use_toolcall_reward == "none" and g.rollout.rollout_filter_ratio == 1.0
    gi = load_config("gigpo")
    assert (gi.algorithm.adv_estimator, gi.algorithm.gamma, gi.algorithm.gigpo.mode) == ("gigpo", 0.95, "mean_std_norm")


def test_inheritance_applies_parent_then_child() -> None:
    spear = load_preset_dict("spear")
    assert spear["actor"]["clip_ratio_high"] == 0.28  # from drbot
    assert spear["actor"]["lr"] == 1e-6  # from grpo, two levels up
    assert spear["actor"]["policy_loss"]["loss_mode"] == "clip_cov"  # spear's own
    assert "inherit" not in spear


def test_overrides_parse_yaml_scalars_and_nest() -> None:
    parsed = parse_overrides(["actor.clip_ratio_high=0.3", "replay.tolerate_steps_cap=null", "model.path=a/b"])
    assert parsed == {"actor": {"clip_ratio_high": 0.3}, "replay": {"tolerate_steps_cap": None}, "model": {"path": "a/b"}}
    c = load_config("spear", ["actor.clip_ratio_high=0.3", "algorithm.adv_estimator=gigpo"])
    assert c.actor.clip_ratio_high == 0.3 and c.algorithm.adv_estimator == "gigpo"


def test_config_file_sits_between_preset_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("actor:\n  clip_ratio_high: 0.4\n  lr: 2.0e-6\n")
    c = load_config("grpo", ["actor.lr=3e-6"], config_file=path)
    assert (c.actor.clip_ratio_high, c.actor.lr) == (0.4, 3e-6)


def test_config_file_can_inherit_a_preset(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("inherit: spear-official\nreplay:\n  trajectory_buffer_size: 64\n")
    c = load_config("grpo", config_file=path)
    assert c.replay.trajectory_buffer_size == 64 and c.actor.policy_loss.loss_mode == "clip_cov"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (
            "actor.clip_ratio_hihg=0.3",
            ["unknown config key 'actor.clip_ratio_hihg'", "Did you mean 'actor.clip_ratio_high'"],
        ),
        ("actor.adv_estimator=gigpo", ["unknown config key 'actor.adv_estimator'", "'algorithm.adv_estimator'"]),
        (
            "algorithm.adv_estimator=grpoo",
            ["'algorithm.adv_estimator'", "'grpoo'", "allowed values: 'grpo', 'gigpo'"],
        ),
        (
            "actor.policy_loss.loss_mode=clip-cov",
            ["'actor.policy_loss.loss_mode'", "'clip-cov'", "'vanilla', 'clip_cov', 'kl_cov', 'gpg'"],
        ),
        (
            "actor.loss_agg_mode=mean",
            ["'actor.loss_agg_mode'", "'mean'", "'token-mean'", "'seq-mean-token-sum-norm'"],
        ),
        ("actor.clip_ratio_c=0.5", ["'actor.clip_ratio_c'", "0.5", "greater than 1"]),
        ("actor.lr=fast", ["'actor.lr'", "'fast'", "valid number"]),
        ("actor.ppo_mini_batch_size=12", ["actor.ppo_mini_batch_size (12)", "multiple of"]),
        ("rollout.rollout_filter_ratio=0.01", ["rollout.rollout_filter_ratio=0.01", "keeps no group"]),
        ("replay.replay_trigger=always", ["'replay.replay_trigger'", "'when_full_then_flush', 'every_step'"]),
    ],
)
def test_bad_values_name_key_value_and_allowed(override: str, expected: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        load_config("spear", [override])
    for fragment in expected:
        assert fragment in str(info.value)


def test_malformed_override_and_unknown_preset() -> None:
    with pytest.raises(ConfigError, match="not of the form key=value"):
        parse_overrides(["actor.lr"])
    with pytest.raises(ConfigError, match=r"unknown preset 'speer'\. Did you mean 'spear'"):
        load_config("speer")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("spear", config_file="/nonexistent/x.yaml")


def test_inheritance_loop_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "loop.yaml"
    path.write_text(f"inherit: {path.stem}\n")
    import spear_engine.config_loading as loading

    original = loading.PRESET_DIR
    loading.PRESET_DIR = tmp_path
    try:
        with pytest.raises(ConfigError, match="loops"):
            loading.load_preset_dict("loop")
    finally:
        loading.PRESET_DIR = original


def test_actor_config_reads_like_verl_config() -> None:
    actor = load_config("spear-official").actor
    assert actor.get("clip_ratio_c", 3.0) == 10.0
    assert actor.get("not_a_key", 7) == 7
    assert actor.global_batch_info == {} and actor.legacy_agg_loss
    assert actor.policy_loss.get("clip_cov_ub_replay") == 60.0


def test_schema_keys_cover_the_spec_knobs() -> None:
    keys = set(all_config_keys())
    spec_knobs = {
        "algorithm.adv_estimator", "algorithm.norm_adv_by_std_in_grpo", "algorithm.gamma",
        "algorithm.gigpo.mode", "algorithm.gigpo.step_advantage_w", "algorithm.use_toolcall_reward",
        "algorithm.max_toolcall_steps", "algorithm.invalid_action_penalty_coef",
        "algorithm.filter_overlong_responses", "algorithm.filter_incomplete_responses",
        "algorithm.filter_repetitive_responses", "algorithm.filter_unreadable_responses",
        "actor.clip_ratio", "actor.clip_ratio_low", "actor.clip_ratio_high", "actor.clip_ratio_c",
        "actor.loss_agg_mode", "actor.entropy_coeff", "actor.use_kl_loss", "actor.kl_loss_coef",
        "actor.kl_loss_type", "actor.ppo_mini_batch_size", "actor.ppo_micro_batch_size_per_gpu",
        "actor.policy_loss.loss_mode", "actor.policy_loss.clip_cov_ratio", "actor.policy_loss.clip_cov_lb",
        "actor.policy_loss.clip_cov_ub", "actor.policy_loss.kl_cov_ratio", "actor.policy_loss.ppo_kl_coef",
        "actor.policy_loss.clip_cov_ratio_replay", "actor.policy_loss.clip_cov_lb_replay",
        "actor.policy_loss.clip_cov_ub_replay", "actor.policy_loss.kl_cov_ratio_replay",
        "replay.enable_trajectory_replay", "replay.trajectory_buffer_size", "replay.trajectory_tolerate_steps",
        "replay.replay_loss_coef", "replay.max_replay_loss_steps", "replay.weight_decay_trajectory_replay",
        "replay.baseline_buffer_size", "replay.trajectory_score_threshold",
        "rollout.rollout_filter_ratio", "rollout.rollout_filter_type", "data.max_response_length",
        "env.rollout.n", "env.max_steps",
    }  # fmt: skip
    assert spec_knobs <= keys, sorted(spec_knobs - keys)


def _differing_keys(a: SpearConfig, b: SpearConfig) -> set[str]:
    def flat(d: dict, prefix: str = "") -> dict[str, object]:
        out: dict[str, object] = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    fa, fb = flat(a.model_dump()), flat(b.model_dump())
    return {k for k in fa if fa[k] != fb[k]}


def test_readme_lists_every_difference_between_spear_and_spear_official() -> None:
    """The README's table must name each knob on which the two presets differ (and no others)."""
    diff = _differing_keys(load_config("spear"), load_config("spear-official")) - {"preset", "description"}
    text = README.read_text()
    section = text.split("## `spear` vs `spear-official`", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| `([a-z0-9_.]+)` \|", section, flags=re.M))
    assert diff == listed, {"missing from README": sorted(diff - listed), "not a difference": sorted(listed - diff)}


def test_config_to_yaml_reloads() -> None:
    import yaml

    c = load_config("gigpo-spear")
    assert validate_config(yaml.safe_load(config_to_yaml(c))) == c


def test_switching_env_drops_the_kwargs_of_the_previous_env() -> None:
    quick = load_config("quickstart", [])
    assert quick.env.name == "twx" and quick.env.kwargs["game"] == "twc"
    switched = load_config("quickstart", ["env.name=alfworld"])
    assert switched.env.name == "alfworld" and switched.env.kwargs == {}
    assert switched.env.max_steps == quick.env.max_steps  # only the kwargs belong to the env
    with_own = load_config("quickstart", ["env.name=alfworld", "env.kwargs={task_types: [clean]}"])
    assert with_own.env.kwargs == {"task_types": ["clean"]}
    same = load_config("quickstart", ["env.name=twx", "env.kwargs={eval_fold: test}"])
    assert same.env.kwargs == {**quick.env.kwargs, "eval_fold": "test"}
