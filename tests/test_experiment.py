"""``spear experiment``: matched arms from one warm-up per seed, resumable, one results folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from spear_engine.cli import main as cli_main
from spear_engine.config_loading import ConfigError
from spear_engine.envs.base import Action, Observation, StepResult, register_env
from spear_engine.experiment import (
    arm_config,
    check_matched,
    load_experiment,
    main,
    run_experiment,
    select,
    warmup_config,
)
from spear_engine.metrics import read_metrics


@register_env("hallway")
class HallwayEnv:
    """Two rooms east wins; gold path ``go east`` twice. Eval and train seeds play the same game."""

    name = "hallway"

    def __init__(self, max_steps: int = 3) -> None:
        self.max_steps = max_steps

    def reset(self, seed: int, split: str = "train") -> Observation:
        self.t, self.pos = 0, 0
        return self._observation()

    def _observation(self) -> Observation:
        return Observation(f"room {self.pos}", task="reach room 2", admissible_actions=["go east", "look"])

    def step(self, action: Action) -> StepResult:
        self.t += 1
        self.pos += action.text == "go east"
        won = self.pos >= 2
        return StepResult(self._observation(), 10.0 if won else 0.0, won or self.t >= self.max_steps, won,
                          action.kind == "command")  # fmt: skip

    def gold_actions(self) -> list[Action]:
        return [Action("command", "go east")] * (2 - self.pos)

    def close(self) -> None:
        pass


COMMON = {
    "model": {"path": "tiny"},
    "env": {"name": "hallway", "max_steps": 3, "rollout": {"n": 2}},
    "data": {"train_batch_size": 2, "max_response_length": 12, "max_prompt_length": 512, "val_batch_size": 4},
    "actor": {"lr": 0.003, "ppo_mini_batch_size": 64, "ppo_micro_batch_size_per_gpu": 4},
    "rollout": {"rollout_filter_ratio": 1.0, "name": "hf"},
    "algorithm": {"filter_incomplete_responses": False, "filter_overlong_responses": False},
    "replay": {"trajectory_buffer_size": 8},
    "trainer": {"test_freq": 1, "val_episodes": 3, "save_freq": 1, "keep_checkpoints": 1, "logger": ["jsonl"]},
}
SPEC = {
    "description": "tiny", "seeds": [0], "steps": 2, "common": COMMON,
    "warmup": {"trainer": {"sft_warmup_steps": 2, "sft_episodes": 2, "sft_rows_per_step": 4, "sft_lr": 0.01}},
    "arms": {"drbot": {"preset": "drbot"},
             "bonus-only": {"preset": "spear", "config": {"replay": {"enable_trajectory_replay": False}}}},
}  # fmt: skip


def write_spec(tmp_path: Path, **changes: object) -> str:
    path = tmp_path / "tiny-experiment.yaml"
    path.write_text(yaml.safe_dump({**SPEC, **changes}, sort_keys=False))
    return str(path)


class InProcess:
    """Runs each stage in this process (the test env is registered here only) and records the calls."""

    def __init__(self, fail: set[str] = frozenset()) -> None:
        self.calls: list[list[str]] = []
        self.fail = fail

    def __call__(self, args: list[str], log: Path) -> int:
        self.calls.append(args)
        if args[0] in self.fail:
            return 1
        return main(args)


def test_arms_share_the_warmup_and_differ_only_in_their_algorithm(tmp_path: Path) -> None:
    spec = load_experiment(write_spec(tmp_path))
    drbot, bonus = (arm_config(spec, arm, 0, tmp_path / "w").model_dump() for arm in spec.arms)
    assert drbot["model"] == bonus["model"] and drbot["model"]["path"] == str(tmp_path / "w")
    for section in ("env", "data"):
        assert drbot[section] == bonus[section]
    assert drbot["trainer"]["total_training_steps"] == 2 and drbot["trainer"]["sft_warmup_steps"] == 0
    assert drbot["trainer"]["val_before_train"] is False  # step 0 is the warm-up's evaluation
    assert drbot["algorithm"]["use_toolcall_reward"] == "none" and bonus["algorithm"]["use_toolcall_reward"] == "cosine"
    warm = warmup_config(spec, 5)
    assert (warm.trainer.seed, warm.trainer.sft_warmup_steps, warm.model.path) == (5, 2, "tiny")


def test_unmatched_arms_user_set_fixed_keys_and_unknown_arms_are_refused(tmp_path: Path) -> None:
    uneven = {**SPEC["arms"], "drbot": {"preset": "drbot", "config": {"env": {"max_steps": 5}}}}
    with pytest.raises(ConfigError, match="differ in env"):
        check_matched(load_experiment(write_spec(tmp_path, arms=uneven)))
    spec = load_experiment(write_spec(tmp_path))
    with pytest.raises(ConfigError, match=r"model\.path is set by the experiment"):
        arm_config(spec, "drbot", 0, "w", ["model.path=other"])
    with pytest.raises(ConfigError, match="unknown arm"):
        select(spec, arms=["spear"])
    with pytest.raises(ConfigError, match="no experiment"):
        load_experiment("no-such-experiment")


def test_an_experiment_runs_resumes_and_extends(tmp_path: Path) -> None:
    out = tmp_path / "results"
    name = write_spec(tmp_path, keep_final_checkpoint=True)
    stages = InProcess()
    assert run_experiment(name, out, stage_runner=stages, report=lambda _: None) == []
    assert [c[0] for c in stages.calls] == ["warmup", "arm", "arm"]
    start = json.loads((out / "warmup" / "seed0" / "eval.json").read_text())
    assert set(start) >= {"val/success_rate", "val_greedy/success_rate", "time/eval"}
    assert (out / "warmup" / "seed0" / "model" / "config.json").is_file()
    for arm in ("drbot", "bonus-only"):
        run = out / "runs" / arm / "seed0"
        records = read_metrics(run)
        assert [r["step"] for r in records] == [0, 1, 2]
        assert {k: records[0][k] for k in start} == pytest.approx(start)  # every arm starts from the same eval
        assert all("val/success_rate" in r and "val_greedy/success_rate" in r for r in records)
        assert json.loads((run / "done.json").read_text())["steps"] == 2
        assert yaml.safe_load((run / "config.yaml").read_text())["model"]["path"] == str(
            (out / "warmup" / "seed0" / "model").resolve()
        )

    again = InProcess()  # a finished experiment: nothing to do
    assert run_experiment(name, out, stage_runner=again, report=lambda _: None) == []
    assert again.calls == []

    longer = InProcess()  # more steps continue each run from its last checkpoint
    assert run_experiment(name, out, steps=3, arms=["drbot"], stage_runner=longer, report=lambda _: None) == []
    assert [c[0] for c in longer.calls] == ["arm"]
    assert [r["step"] for r in read_metrics(out / "runs" / "drbot" / "seed0")] == [0, 1, 2, 3]


def test_a_failed_stage_is_reported_and_the_other_seeds_still_run(tmp_path: Path) -> None:
    stages = InProcess(fail={"warmup"})
    failed = run_experiment(write_spec(tmp_path, seeds=[0, 1]), tmp_path / "r", stage_runner=stages,
                            report=lambda _: None)  # fmt: skip
    assert [c[0] for c in stages.calls] == ["warmup", "warmup"]
    assert [f.split(" (")[0] for f in failed] == ["warmup seed 0", "warmup seed 1"]


class RecordedStages:
    """Stands in for the stage processes: a warm-up writes ``evaluation`` and a model folder, an arm nothing."""

    def __init__(self, evaluation: dict[str, float]) -> None:
        self.evaluation = evaluation
        self.calls: list[str] = []

    def __call__(self, args: list[str], log: Path) -> int:
        self.calls.append(args[0])
        if args[0] == "warmup":
            model = Path(args[2]) / "model"
            model.mkdir(parents=True, exist_ok=True)
            (model / "config.json").write_text("{}")
            (Path(args[2]) / "eval.json").write_text(json.dumps(self.evaluation))
        return 0


def test_a_cloned_warmup_without_its_weights_is_trained_again_and_checked_against_its_record(
    tmp_path: Path,
) -> None:
    out, name = tmp_path / "r", write_spec(tmp_path)
    warm = out / "warmup" / "seed0"
    recorded = {"val/success_rate": 0.5, "val_greedy/success_rate": 0.25, "time/eval": 3.0}

    def clone_without_weights() -> None:  # what a fresh clone of a committed results folder holds
        if warm.exists():
            shutil.rmtree(warm)
        warm.mkdir(parents=True)
        (warm / "eval.json").write_text(json.dumps(recorded))

    clone_without_weights()
    messages: list[str] = []
    same = RecordedStages({**recorded, "time/eval": 9.0})  # timings may differ
    assert run_experiment(name, out, stage_runner=same, report=messages.append) == []
    assert same.calls == ["warmup", "arm", "arm"]
    assert any("weights" in m and "missing" in m for m in messages)
    assert any("evaluates exactly as recorded" in m for m in messages)
    assert not any("WARNING" in m for m in messages)

    clone_without_weights()
    messages.clear()
    other = RecordedStages({**recorded, "val/success_rate": 0.375})
    assert run_experiment(name, out, stage_runner=other, report=messages.append) == []
    assert other.calls == ["warmup", "arm", "arm"]
    warnings = [m for m in messages if "WARNING" in m]
    assert len(warnings) == 1 and "val/success_rate 0.5 -> 0.375" in warnings[0]
    assert "val_greedy" not in warnings[0]  # only what changed is named

    clone_without_weights()  # every run of the seed finished: its weights are not needed
    for arm in ("drbot", "bonus-only"):
        (out / "runs" / arm / "seed0").mkdir(parents=True, exist_ok=True)
        (out / "runs" / arm / "seed0" / "done.json").write_text(json.dumps({"steps": 2}))
    idle = RecordedStages(recorded)
    assert run_experiment(name, out, stage_runner=idle, report=lambda _: None) == []
    assert idle.calls == []


def test_finished_runs_drop_their_checkpoints_unless_kept(tmp_path: Path) -> None:
    out = tmp_path / "r"
    assert run_experiment(write_spec(tmp_path, steps=1), out, arms=["drbot"], stage_runner=InProcess(),
                          report=lambda _: None) == []  # fmt: skip
    assert not (out / "runs" / "drbot" / "seed0" / "checkpoints").exists()
    assert (out / "runs" / "drbot" / "seed0" / "metrics.jsonl").is_file()
    recorded = yaml.safe_load((out / "experiment.yaml").read_text())
    assert list(recorded["arms"]) == ["drbot", "bonus-only"] and recorded["seeds"] == [0]  # not the selection


def test_the_cli_lists_experiments_and_rejects_bad_seeds(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["experiment"]) == 0
    assert "twc-cpu" in capsys.readouterr().out
    assert cli_main(["experiment", "twc-cpu", "--seeds", "a,b"]) == 2
    assert "--seeds takes comma-separated integers" in capsys.readouterr().err


def test_the_built_in_experiment_is_matched() -> None:
    spec = load_experiment("twc-cpu")
    check_matched(spec)
    assert len(spec.seeds) >= 3 and {"drbot", "spear", "grpo", "replay-only", "bonus-only"} <= set(spec.arms)
    assert spec.common["trainer"]["val_episodes"] >= 128
