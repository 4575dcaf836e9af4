"""The trainer end to end with the tiny model: every preset, exact resume, checkpoints, the CLI."""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from replay_rows import admit_winning_rows

from spear_engine.cli import main
from spear_engine.config_loading import load_config
from spear_engine.envs.base import Action, Observation, StepResult, register_env
from spear_engine.metrics import read_metrics
from spear_engine.train.checkpoint import list_checkpoints, load_checkpoint
from spear_engine.train.trainer import Trainer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@register_env("lucky")
class LuckyEnv:
    """A two-step game whose reward depends on the sampled text (a hash), so a random policy gets
    a mix of successes and failures: advantages, admissions and replay all happen with the tiny model."""

    name = "lucky"

    def __init__(self, max_steps: int = 2) -> None:
        self.max_steps, self.t = max_steps, 0

    def reset(self, seed: int, split: str = "train") -> Observation:
        self.t, self.seed = 0, seed
        return Observation(f"room {seed % 7}", task="say something lucky", admissible_actions=["a", "b"])

    def step(self, action: Action) -> StepResult:
        self.t += 1
        lucky = zlib.crc32(f"{self.seed}:{action.text}".encode()) % 3 == 0
        done = lucky or self.t >= self.max_steps
        obs = Observation(f"room {(self.seed + self.t) % 7}", task="say something lucky", admissible_actions=["a", "b"])
        return StepResult(obs, 10.0 if lucky else 0.0, done, lucky, action.kind == "command")

    def gold_actions(self) -> list[Action]:
        return []

    def close(self) -> None:
        pass


TINY = [
    "model.path=tiny", "env.name=lucky", "env.max_steps=2", "data.train_batch_size=2", "env.rollout.n=3",
    "data.max_response_length=12", "data.max_prompt_length=768", "actor.ppo_mini_batch_size=8",
    "actor.ppo_micro_batch_size_per_gpu=4", "trainer.logger=[jsonl]", "trainer.test_freq=0", "actor.lr=0.01",
    "trainer.val_episodes=2", "algorithm.filter_incomplete_responses=false", "algorithm.filter_overlong_responses=false", "rollout.rollout_filter_ratio=1.0",
    "replay.trajectory_buffer_size=8",
]  # fmt: skip


def tiny_config(preset: str, tmp_path: Path, steps: int, *extra: str):
    return load_config(preset, [*TINY, f"trainer.total_training_steps={steps}", f"trainer.output_dir={tmp_path}",
                                "trainer.run_name=run", *extra])  # fmt: skip


@pytest.mark.parametrize("preset", ["grpo", "drbot", "gigpo", "spear", "gigpo-spear", "spear-official"])
def test_every_preset_trains_a_few_steps(preset: str, tmp_path: Path) -> None:
    extra = ["rollout.name=hf", "trainer.n_gpus_per_node=1", "data.pad_batch_by_duplication=false",
             "rollout.rollout_filter_pow2_subsample=false"] if preset == "spear-official" else []  # fmt: skip
    config = tiny_config(preset, tmp_path, 3, "trainer.save_freq=2", "trainer.test_freq=3", *extra)
    trainer = Trainer(config, console=False)
    rollouts = record_rollouts(trainer)
    history = trainer.fit()
    assert len(history) == 3
    for metrics in history:
        assert all(math.isfinite(v) for v in metrics.values())
    # the success rates are those of the episodes played (LuckyEnv pays 10 exactly when it is won)
    train = [episodes for split, episodes in rollouts if split == "train"]
    val = [episodes for split, episodes in rollouts if split == "eval"]
    # step 0 (before any update) and step 3 (test_freq=3), each sampled and then greedy (spear-official: sampled
    # only, as the official validation), on eval seeds 0-1
    modes = 2 if config.trainer.val_greedy else 1
    assert config.trainer.val_greedy == (preset != "spear-official")
    assert len(train) == 3 and [len(v) for v in val] == [2] * 2 * modes
    for metrics, episodes in zip(history, train):
        wins = [any(turn.reward == 10.0 for turn in e.turns) for e in episodes]
        assert [e.success for e in episodes] == wins
        assert metrics["episode/count"] == len(episodes) == 6
        assert metrics["episode/success_rate"] == pytest.approx(sum(wins) / 6)
        assert 0.0 <= metrics["episode/success_rate"] <= 1.0
    def rate(episodes: list) -> float:
        return sum(any(turn.reward == 10.0 for turn in e.turns) for e in episodes) / len(episodes)

    assert history[-1]["val/success_rate"] == pytest.approx(rate(val[modes]))
    assert records_greedy_match(history[-1], val[modes:], modes)
    assert "val/success_rate" not in history[0] and "val/success_rate" not in history[1]  # test_freq=3
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    assert records[0]["val/success_rate"] == pytest.approx(rate(val[0]))  # the policy before any update
    assert records_greedy_match(records[0], val[:modes], modes)
    assert [c.name for c in list_checkpoints(tmp_path / "run")] == ["step_00000002", "step_00000003"]
    # Whether replay admits rows here depends on what the tiny random model samples, which differs between
    # CPUs; tests/train/test_trajectory_layout.py asserts admissions for every preset with a scripted engine.


def records_greedy_match(metrics: dict, evals: list, modes: int) -> bool:
    """The greedy success rate is that of the second eval rollout of a step; absent when only sampled."""
    if modes == 1:
        return "val_greedy/success_rate" not in metrics
    wins = [any(turn.reward == 10.0 for turn in e.turns) for e in evals[1]]
    return metrics["val_greedy/success_rate"] == pytest.approx(sum(wins) / len(wins))


def record_rollouts(trainer: Trainer) -> list[tuple[str, list]]:
    """Record the (split, episodes) of every rollout the trainer's agent loop plays."""
    calls: list[tuple[str, list]] = []
    run = trainer.agent_loop.run

    def recording(*args, split: str = "train", **kwargs):
        episodes, timing = run(*args, split=split, **kwargs)
        calls.append((split, list(episodes)))
        return episodes, timing

    trainer.agent_loop.run = recording  # type: ignore[method-assign]
    return calls


@register_env("parity")
class ParityEnv:
    """One step, won exactly when the seed is even, whatever the policy says: the success rate of a step is
    known before it is played (the share of even seeds), independent of the model."""

    name = "parity"
    resets: ClassVar[list[tuple[str, int]]] = []

    def __init__(self, max_steps: int = 1) -> None:
        self.seed = 0

    def reset(self, seed: int, split: str = "train") -> Observation:
        self.seed = seed
        ParityEnv.resets.append((split, seed))
        return Observation(f"seed {seed}", task="say something", admissible_actions=["a", "b"])

    def step(self, action: Action) -> StepResult:
        won = self.seed % 2 == 0
        return StepResult(Observation("done", task="say something"), 10.0 if won else 0.0, True, won, True)

    def gold_actions(self) -> list[Action]:
        return []

    def close(self) -> None:
        pass


def test_success_rates_are_the_known_outcomes_of_a_scripted_game(tmp_path: Path) -> None:
    config = tiny_config("grpo", tmp_path, 2, "env.name=parity", "env.max_steps=1", "trainer.test_freq=2",
                         "trainer.val_episodes=5")  # fmt: skip
    trainer = Trainer(config, console=False)
    ParityEnv.resets.clear()
    seeds_per_call: list[tuple[str, list[int]]] = []
    run = trainer.agent_loop.run

    def recording(*args, split: str = "train", **kwargs):
        first = len(ParityEnv.resets)
        out = run(*args, split=split, **kwargs)
        seeds_per_call.append((split, [s for sp, s in ParityEnv.resets[first:] if sp == split]))
        return out

    trainer.agent_loop.run = recording  # type: ignore[method-assign]
    history = trainer.fit()
    train = [seeds for split, seeds in seeds_per_call if split == "train"]
    val = [sorted(seeds) for split, seeds in seeds_per_call if split == "eval"]
    # step 0 and step 2 (test_freq=2), sampled then greedy: every evaluation plays eval seeds 0..4
    assert [len(seeds) for seeds in train] == [6, 6] and val == [[0, 1, 2, 3, 4]] * 4
    for metrics, seeds in zip(history, train):
        assert 0 < sum(s % 2 == 0 for s in seeds) < 6  # a mixed step: neither 0 nor 1 would pass by chance
        assert metrics["episode/success_rate"] == sum(s % 2 == 0 for s in seeds) / 6
        assert metrics["episode/reward/mean"] == 10.0 * sum(s % 2 == 0 for s in seeds) / 6
    assert history[-1]["val/success_rate"] == pytest.approx(3 / 5)  # seeds 0, 2, 4 of 0..4
    assert history[-1]["val_greedy/success_rate"] == pytest.approx(3 / 5)
    records = read_metrics(tmp_path / "run")
    assert records[0]["step"] == 0 and records[0]["val/success_rate"] == pytest.approx(3 / 5)
    assert [r["episode/success_rate"] for r in records[1:]] == [m["episode/success_rate"] for m in history]


def test_eval_seeds_start_at_the_offset(tmp_path: Path) -> None:
    config = tiny_config("grpo", tmp_path, 1, "env.name=parity", "env.max_steps=1", "trainer.val_episodes=9",
                         "trainer.val_seed_offset=7", "data.val_batch_size=8")  # fmt: skip
    trainer = Trainer(config, console=False)
    ParityEnv.resets.clear()
    result = trainer.evaluate()
    # 8 eval episodes ran at once; the pool keeps only the 2 groups x 3 envs a training step uses
    assert len(trainer.agent_loop._envs) == 6
    trainer.close()
    assert sorted(s for split, s in ParityEnv.resets if split == "eval") == list(range(7, 16))
    assert result["val/success_rate"] == pytest.approx(4 / 9)  # seeds 8, 10, 12, 14 are even


def _comparable(record: dict) -> dict:
    return {k: v for k, v in record.items() if not k.startswith(("time/", "perf/", "share/"))}


@pytest.mark.parametrize(("preset", "dtype"), [("spear", "float32"), ("spear-official", "float32"),
                                               ("spear", "bfloat16")])  # fmt: skip
def test_resume_reproduces_the_uninterrupted_run(preset: str, dtype: str, tmp_path: Path) -> None:
    """bfloat16: bf16 weights with fp32 master copies (spear_engine.train.master_weights); the checkpoint
    holds the copies, so the resumed run continues from the exact fp32 weights."""
    extra = ["trainer.deterministic=true", "trainer.save_freq=2", "replay.trajectory_buffer_size=4",
             "rollout.name=hf", "trainer.n_gpus_per_node=1", "data.pad_batch_by_duplication=false",
             f"model.dtype={dtype}"]  # fmt: skip

    def with_replay(trainer: Trainer) -> Trainer:  # the same replay rows in both runs, on every machine
        admit_winning_rows(trainer.sil, trainer.global_step)
        return trainer

    straight = with_replay(Trainer(tiny_config(preset, tmp_path / "a", 4, *extra), console=False)).fit()
    with_replay(Trainer(tiny_config(preset, tmp_path / "b", 2, *extra), console=False)).fit()
    resumed_trainer = Trainer(tiny_config(preset, tmp_path / "b", 4, *extra), console=False)
    assert resumed_trainer.global_step == 2
    resumed = resumed_trainer.fit()
    assert len(resumed) == 2
    for a, b in zip(straight[2:], resumed):
        assert _comparable(a) == _comparable(b)
    assert any(m.get("replay/drawn_rows", 0) > 0 for m in straight)  # the replay path was exercised
    records = read_metrics(tmp_path / "b" / "run")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    state_a = load_checkpoint(list_checkpoints(tmp_path / "a" / "run")[-1])
    state_b = load_checkpoint(list_checkpoints(tmp_path / "b" / "run")[-1])
    for key, value in state_a["backend"]["model"].items():
        torch.testing.assert_close(state_b["backend"]["model"][key], value, rtol=0, atol=0)
    assert state_a["replay"] == state_b["replay"]
    assert {v.dtype for v in state_a["backend"]["model"].values()} == {torch.float32}  # bf16 runs: the fp32 copies


def test_corrupted_checkpoint_is_skipped_for_the_previous_one(tmp_path: Path, capsys) -> None:
    Trainer(tiny_config("grpo", tmp_path, 2, "trainer.save_freq=1"), console=False).fit()
    newest = list_checkpoints(tmp_path / "run")[-1]
    state = newest / "state_rank0.pt"
    state.write_bytes(state.read_bytes()[:-100])
    trainer = Trainer(tiny_config("grpo", tmp_path, 3, "trainer.save_freq=1"), console=False)
    assert trainer.global_step == 1
    assert "truncated" in capsys.readouterr().out
    trainer.close()


def test_cli_train_eval_plot_and_errors(tmp_path: Path, capsys) -> None:
    args = ["train", "--preset", "grpo", *TINY, "trainer.total_training_steps=1", f"trainer.output_dir={tmp_path}",
            "trainer.run_name=cli", "--no-progress"]  # fmt: skip
    assert main(args) == 0
    run = tmp_path / "cli"
    assert (run / "curves.png").stat().st_size > 1000 and (run / "config.yaml").is_file()
    capsys.readouterr()
    assert main(["eval", "--run-dir", str(run), "--episodes", "2", "--greedy"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["step"] == 1 and result["val/count"] == 2.0
    assert result["val/success_rate"] in (0.0, 0.5, 1.0)  # won episodes of 2
    assert main(["plot", str(run), "--out", str(tmp_path / "x.png")]) == 0
    for bad, fragment in [
        (["train", "--preset", "grpoo"], "Did you mean 'grpo'"),
        (["train", "actor.lrr=1"], "Did you mean 'actor.lr'"),
        (["train", "--env", "nowhere", "model.path=tiny"], "unknown environment 'nowhere'"),
        (["train", "model.path=/nonexistent/model", "env.name=lucky"], "/nonexistent/model"),
        (["eval", "--run-dir", str(tmp_path / "missing")], "no config.yaml"),
        (["plot", str(tmp_path / "missing")], "metrics"),
    ]:
        capsys.readouterr()
        assert main(bad) == 2, bad
        err = capsys.readouterr().err
        assert fragment in err and "Traceback" not in err, (bad, err)
