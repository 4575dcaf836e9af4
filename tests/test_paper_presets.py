"""The paper presets (``paper-{alfworld,webshop}-{spear,grpo,drbot}``): Qwen2.5-1.5B-Instruct on ALFWorld and
WebShop at the official scripts' sizes. Each loads and validates; the three algorithms of one environment share
every size / schedule key and differ in algorithm keys only; the sizes are the official ones."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from spear_engine.cli import main
from spear_engine.config import SpearConfig
from spear_engine.config_loading import list_presets, load_config, load_preset_dict, validate_config

ENVS = ("alfworld", "webshop")
ALGOS = ("spear", "grpo", "drbot")
PAPER = [f"paper-{env}-{algo}" for env in ENVS for algo in ALGOS]
BASE = {"spear": "spear", "grpo": "grpo", "drbot": "drbot"}
"""The engine preset each paper preset inherits its algorithm from."""

ALGORITHM_KEYS = {
    "preset",
    "description",
    "actor.clip_ratio",
    "actor.clip_ratio_low",
    "actor.clip_ratio_high",
    "actor.clip_ratio_c",
    "actor.loss_agg_mode",
    "actor.legacy_agg_loss",
    "actor.use_kl_loss",
    "actor.kl_loss_coef",
    "actor.kl_loss_type",
    "actor.use_filtered_response_mask",
    "rollout.rollout_filter_ratio",
    "rollout.rollout_filter_type",
    "rollout.rollout_filter_pow2_subsample",
}
ALGORITHM_PREFIXES = ("algorithm.", "replay.", "actor.policy_loss.")
"""Keys on which SPEAR, GRPO and Dr.BoT may differ: the loss, advantages, rewards, filters and replay. Everything
else (model, env, data sizes, optimiser, mini-batches, rollout engine and sampling, schedule, hardware) must not."""

SIZE_KEYS = [
    "model.path", "model.dtype", "model.gradient_checkpointing", "env.name", "env.kwargs", "env.max_steps",
    "env.history_length", "env.rollout.n", "data.train_batch_size", "data.val_batch_size", "data.max_prompt_length",
    "data.max_response_length", "actor.lr", "actor.weight_decay", "actor.grad_clip", "actor.ppo_epochs",
    "actor.entropy_coeff", "actor.ppo_mini_batch_size", "actor.ppo_micro_batch_size_per_gpu", "rollout.name",
    "rollout.layout", "rollout.temperature", "rollout.val_temperature", "rollout.gpu_memory_utilization",
    "trainer.total_training_steps", "trainer.test_freq", "trainer.save_freq", "trainer.val_episodes",
    "trainer.n_gpus_per_node", "trainer.nnodes", "trainer.backend", "trainer.device",
]  # fmt: skip
"""The size / schedule keys the brief names, checked by name as well (the diff test covers every other key)."""


def flat(config: SpearConfig) -> dict[str, Any]:
    """config.model_dump() as {dotted key: value}; dict-valued keys (env.kwargs) stay one value."""

    def walk(node: dict[str, Any], prefix: str, out: dict[str, Any], model: Any) -> None:
        for key, value in node.items():
            child = getattr(model, key, None)
            if isinstance(value, dict) and isinstance(child, BaseModel):  # a config section, not a dict value
                walk(value, f"{prefix}{key}.", out, child)
            else:
                out[f"{prefix}{key}"] = value

    out: dict[str, Any] = {}
    walk(config.model_dump(), "", out, config)
    return out


def differing_keys(a: SpearConfig, b: SpearConfig) -> set[str]:
    fa, fb = flat(a), flat(b)
    assert fa.keys() == fb.keys()
    return {k for k in fa if fa[k] != fb[k]}


def is_algorithm_key(key: str) -> bool:
    return key in ALGORITHM_KEYS or key.startswith(ALGORITHM_PREFIXES)


def test_the_paper_presets_are_listed() -> None:
    assert set(PAPER) <= set(list_presets())


@pytest.mark.parametrize("name", PAPER)
def test_paper_preset_loads_validates_and_round_trips(name: str) -> None:
    config = load_config(name)
    assert config.preset == name
    assert validate_config(config.model_dump()) == config
    assert validate_config(yaml.safe_load(yaml.safe_dump(config.model_dump(mode="json")))) == config
    raw = load_preset_dict(name)
    assert raw["description"].startswith("Paper setting: ") and raw["description"] != load_preset_dict(
        BASE[name.rsplit("-", 1)[1]]
    ).get("description")


@pytest.mark.parametrize("name", PAPER)
def test_spear_presets_prints_the_resolved_yaml(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["presets", name]) == 0
    assert validate_config(yaml.safe_load(capsys.readouterr().out)) == load_config(name)


def test_spear_presets_lists_each_with_its_description(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["presets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for name in PAPER:
        description = load_preset_dict(name)["description"]
        assert any(line.split(None, 1) == [name, description] for line in lines), (name, lines)


@pytest.mark.parametrize("env", ENVS)
@pytest.mark.parametrize("pair", [("spear", "grpo"), ("spear", "drbot"), ("grpo", "drbot")])
def test_algorithms_of_one_env_differ_in_algorithm_keys_only(env: str, pair: tuple[str, str]) -> None:
    a, b = (load_config(f"paper-{env}-{algo}") for algo in pair)
    diff = differing_keys(a, b)
    assert {k for k in diff if not is_algorithm_key(k)} == set(), "a size / schedule key differs"
    fa, fb = flat(a), flat(b)
    assert {k: fa[k] for k in SIZE_KEYS} == {k: fb[k] for k in SIZE_KEYS}
    assert diff - {"preset", "description"}, "the two algorithms are the same config"
    if "spear" in pair:
        assert "replay.enable_trajectory_replay" in diff


@pytest.mark.parametrize("name", PAPER)
def test_paper_preset_keeps_the_algorithm_of_its_base_preset(name: str) -> None:
    """The algorithm is the engine's preset's; the only algorithm keys set here are the ones the official script
    of that environment pins: the GRPO baseline scripts pass clip_ratio_c=10.0 and kl_loss_coef=0.0 (``grpo``
    keeps verl's 3.0 / 0.001), and the WebShop SPEAR script means a SIL warm-up of 200 steps (ALFWorld: 100, as
    ``spear``); docs/algorithm.md, 'Schedules'."""
    env, algo = name.split("-")[1:]
    expected = {
        ("alfworld", "spear"): set(),
        ("webshop", "spear"): {"replay.max_replay_loss_steps"},
        ("alfworld", "grpo"): {"actor.clip_ratio_c", "actor.kl_loss_coef"},
        ("webshop", "grpo"): {"actor.clip_ratio_c", "actor.kl_loss_coef"},
        ("alfworld", "drbot"): set(),
        ("webshop", "drbot"): set(),
    }[env, algo]
    diff = {k for k in differing_keys(load_config(name), load_config(BASE[algo])) if is_algorithm_key(k)}
    assert diff - {"preset", "description"} == expected


@pytest.mark.parametrize("algo", ALGOS)
def test_alfworld_and_webshop_differ_in_the_official_sizes_only(algo: str) -> None:
    """docs/algorithm.md, 'Official run settings': the two columns differ in max_steps, prompt length,
    mini/micro-batch and training steps (and, for SPEAR, the intended SIL warm-up T)."""
    diff = differing_keys(load_config(f"paper-alfworld-{algo}"), load_config(f"paper-webshop-{algo}"))
    expected = {
        "preset", "description", "env.name", "env.max_steps", "data.max_prompt_length",
        "actor.ppo_mini_batch_size", "actor.ppo_micro_batch_size_per_gpu", "trainer.total_training_steps",
    }  # fmt: skip
    if algo == "spear":
        expected.add("replay.max_replay_loss_steps")
    assert diff == expected


# docs/algorithm.md, 'Official run settings': what the two columns set differently. env -> (max_steps,
# max_prompt_length, mini-batch, mini-batch per GPU, micro-batch per GPU, training steps).
OFFICIAL_SIZES = {
    "alfworld": (50, 2048, 1024, 512, 8, 200),  # run_alfworld{,_drbot,_spear}.sh
    "webshop": (15, 4096, 256, 128, 4, 350),  # run_webshop{,_drbot,_spear}.sh
}


@pytest.mark.parametrize("env", ENVS)
@pytest.mark.parametrize("algo", ALGOS)
def test_sizes_are_the_official_scripts(env: str, algo: str) -> None:
    """docs/algorithm.md, 'Official run settings' (the run scripts, verl-agent ppo_trainer.yaml where a
    script keeps the default): Qwen2.5-1.5B-Instruct, 32 groups x 8, history 2, 512 response tokens, lr
    1e-6, test_freq 5, save_freq 10, 128 validation envs at temperature 0.4, vLLM at 0.6 of the GPU,
    1 node x 2 GPUs; ALFWorld: 50 turns, 2048 prompt tokens, mini-batch 1024 (512 per GPU), micro 8,
    200 steps; WebShop: 15 turns, 4096 prompt tokens, mini-batch 256 (128 per GPU), micro 4, 350 steps."""
    max_steps, prompt, mini, mini_per_gpu, micro, steps = OFFICIAL_SIZES[env]
    c = load_config(f"paper-{env}-{algo}")
    assert c.model.path == "Qwen/Qwen2.5-1.5B-Instruct"
    assert (c.env.name, c.env.rollout.n, c.env.max_steps, c.env.history_length) == (env, 8, max_steps, 2)
    assert (c.data.train_batch_size, c.data.max_prompt_length, c.data.max_response_length) == (32, prompt, 512)
    assert (c.actor.ppo_mini_batch_size, c.actor.ppo_micro_batch_size_per_gpu) == (mini, micro)
    assert c.actor.ppo_mini_batch_size // c.trainer.n_gpus_per_node == mini_per_gpu
    assert (c.actor.lr, c.actor.ppo_epochs, c.actor.grad_clip, c.actor.entropy_coeff) == (1e-6, 1, 1.0, 0.001)
    assert (c.trainer.total_training_steps, c.trainer.test_freq, c.trainer.save_freq) == (steps, 5, 10)
    assert (c.trainer.val_episodes, c.data.val_batch_size, c.rollout.val_temperature) == (128, 128, 0.4)
    assert (c.trainer.n_gpus_per_node, c.trainer.nnodes) == (2, 1)


@pytest.mark.parametrize("name", PAPER)
def test_gpu_deployment_settings(name: str) -> None:
    """What a GPU user needs unchanged: bf16 weights under ZeRO-3 (fp32 master weights in DeepSpeed, as verl's
    FSDP mixed precision), gradient checkpointing (enable_gradient_checkpointing=True in every script), vLLM
    with gpu_memory_utilization 0.6, the rank's GPU. device is ``auto`` (not ``cuda``) so the preset also runs
    where CI has no GPU (tests/train/test_config_keys_read.py trains every preset on CPU)."""
    c = load_config(name)
    assert (c.model.dtype, c.model.gradient_checkpointing) == ("bfloat16", True)
    assert (c.rollout.name, c.rollout.gpu_memory_utilization) == ("vllm", 0.6)
    assert (c.trainer.backend, c.trainer.device) == ("deepspeed", "auto")
    assert (c.rollout.temperature, c.rollout.top_p, c.rollout.top_k, c.rollout.layout) == (1.0, 1.0, -1, "step")


@pytest.mark.parametrize("env", ENVS)
def test_algorithm_spot_checks(env: str) -> None:
    """docs/algorithm.md, 'Official run settings' and 'Dr.BoT filters': SPEAR has replay, clip-cov with the
    replay constants 0.02 / 2 / 60, the cosine tool bonus over 200 steps; GRPO is eps 0.2/0.2 with std-normalised
    advantages, token-mean, no filters, no replay, no bonus; Dr.BoT is clip-higher 0.28, no std, sum-norm, the
    filters and the 75 % group filter, no replay."""
    spear, grpo, drbot = (load_config(f"paper-{env}-{algo}") for algo in ALGOS)
    assert spear.replay.enable_trajectory_replay and spear.replay.replay_loss_coef == 1.0
    assert spear.replay.max_replay_loss_steps == {"alfworld": 100, "webshop": 200}[env]
    pl = spear.actor.policy_loss
    assert (pl.loss_mode, pl.clip_cov_ratio_replay, pl.clip_cov_lb_replay, pl.clip_cov_ub_replay) == (
        "clip_cov", 0.02, 2.0, 60.0,
    )  # fmt: skip
    assert (spear.algorithm.use_toolcall_reward, spear.algorithm.max_toolcall_steps) == ("cosine", 200)
    assert not grpo.replay.enable_trajectory_replay and grpo.algorithm.use_toolcall_reward == "none"
    assert (grpo.actor.clip_ratio_low, grpo.actor.clip_ratio_high, grpo.actor.clip_ratio_c) == (0.2, 0.2, 10.0)
    assert grpo.algorithm.norm_adv_by_std_in_grpo and grpo.actor.loss_agg_mode == "token-mean"
    assert not grpo.algorithm.filter_incomplete_responses and grpo.rollout.rollout_filter_ratio == 1.0
    assert not drbot.replay.enable_trajectory_replay and drbot.algorithm.use_toolcall_reward == "none"
    assert (drbot.actor.clip_ratio_high, drbot.actor.clip_ratio_c, drbot.actor.loss_agg_mode) == (
        0.28, 10.0, "seq-mean-token-sum-norm",
    )  # fmt: skip
    assert not drbot.algorithm.norm_adv_by_std_in_grpo and drbot.algorithm.filter_incomplete_responses
    assert drbot.rollout.rollout_filter_ratio == 0.75
    for c in (spear, grpo, drbot):
        assert not c.actor.use_kl_loss and not c.algorithm.use_kl_in_reward
        assert c.algorithm.invalid_action_penalty_coef == 0.1
