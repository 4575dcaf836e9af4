"""The trainer end to end with the tiny model: every preset, exact resume, checkpoints, the CLI."""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import pytest
import torch

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
    history = Trainer(config, console=False).fit()
    assert len(history) == 3
    for metrics in history:
        assert all(math.isfinite(v) for v in metrics.values())
    assert history[-1]["val/success_rate"] >= 0.0
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2, 3]
    assert [c.name for c in list_checkpoints(tmp_path / "run")] == ["step_00000002", "step_00000003"]
    if config.replay.enable_trajectory_replay:
        assert any(m.get("replay/admitted_rows", 0) > 0 for m in history)


def _comparable(record: dict) -> dict:
    return {k: v for k, v in record.items() if not k.startswith(("time/", "perf/", "share/"))}


@pytest.mark.parametrize("preset", ["spear", "spear-official"])
def test_resume_reproduces_the_uninterrupted_run(preset: str, tmp_path: Path) -> None:
    extra = ["trainer.deterministic=true", "trainer.save_freq=2", "replay.trajectory_buffer_size=4",
             "rollout.name=hf", "trainer.n_gpus_per_node=1", "data.pad_batch_by_duplication=false"]  # fmt: skip
    straight = Trainer(tiny_config(preset, tmp_path / "a", 4, *extra), console=False).fit()
    Trainer(tiny_config(preset, tmp_path / "b", 2, *extra), console=False).fit()
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
    assert result["step"] == 1 and 0.0 <= result["val/success_rate"] <= 1.0
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
