"""``spear experiment``: a matched comparison of algorithm arms over seeds, resumable, in one folder.

An experiment file (``spear_engine/experiments/<name>.yaml``, or any YAML path) names the arms (a preset
each, plus an optional config layer), the seeds, the step count and a ``common`` config layer that every
arm gets (model, environment, sizes, schedules, evaluation), so the arms differ in their algorithm only.
Per seed, one SFT warm-up is trained and saved once; every arm of that seed starts from those weights
and shares its step-0 evaluation. Layout of the results folder::

    <out>/experiment.yaml                     the whole experiment (every arm and seed; CLI steps applied)
    <out>/warmup/seed<k>/                     warm-up run: metrics.jsonl, eval.json, model/ (not committed:
                                              trained again, and checked against eval.json, when missing)
    <out>/runs/<arm>/seed<k>/                 one training run: config.yaml, metrics.jsonl, done.json,
                                              machines.jsonl (where its steps ran), train.log and
                                              checkpoints/ (the last two not committed)
    <out>/results.md, results.json, compare.png   written by ``spear compare <out>``

Every stage runs in its own process (an engine and a model per process, memory returned when it ends).
Running the same command again skips finished stages and resumes an interrupted run from its newest
checkpoint; a larger ``--steps`` extends finished runs (when ``keep_final_checkpoint`` kept their state).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from spear_engine.config import SpearConfig
from spear_engine.config_loading import (
    ConfigError,
    config_to_yaml,
    load_preset_dict,
    merge_layer,
    parse_overrides,
    validate_config,
)
from spear_engine.machine import record_machine

EXPERIMENTS_DIR = Path(__file__).parent / "experiments"
DONE_FILE = "done.json"
START_EVAL_FILE = "eval.json"


class ArmSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    preset: str
    config: dict[str, Any] = Field(default_factory=dict)
    """A config layer over the preset and the common layer (nested sections, as in a preset file)."""


class ExperimentSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    description: str = ""
    seeds: list[int] = Field(min_length=1)
    steps: int = Field(ge=1)
    """RL steps per run (after the shared warm-up)."""
    common: dict[str, Any] = Field(default_factory=dict)
    """Config layer every arm and the warm-up get, over the arm's preset."""
    warmup: dict[str, Any] = Field(default_factory=dict)
    """Config layer of the warm-up run only (``trainer.sft_*``)."""
    arms: dict[str, ArmSpec] = Field(min_length=1)
    keep_final_checkpoint: bool = False
    """Keep a finished run's last checkpoint (about 12 bytes per parameter: weights and Adam moments) so a
    larger ``--steps`` can extend it; off, the finished run keeps its metrics only."""

    @field_validator("arms")
    @classmethod
    def _arm_names_are_folder_names(cls, arms: dict[str, ArmSpec]) -> dict[str, ArmSpec]:
        for name in arms:
            if not name or "/" in name or name.startswith("."):
                raise ValueError(f"arm name {name!r} must be a plain folder name")
        return arms


def list_experiments() -> list[str]:
    return sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.yaml"))


def experiment_path(name: str) -> Path:
    """A built-in experiment by name, or a YAML file by path."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    built_in = EXPERIMENTS_DIR / f"{name}.yaml"
    if built_in.is_file():
        return built_in
    raise ConfigError(f"no experiment {name!r}; built-in ones: {', '.join(list_experiments()) or 'none'}, or pass "
                      f"the path of an experiment YAML file")  # fmt: skip


def load_experiment(name: str) -> ExperimentSpec:
    path = experiment_path(name)
    try:
        raw = yaml.safe_load(path.read_text())
        return ExperimentSpec.model_validate(raw)
    except (yaml.YAMLError, ValueError) as err:
        raise ConfigError(f"experiment file {path} is not valid: {err}") from err


def select(spec: ExperimentSpec, seeds: Sequence[int] | None = None, arms: Sequence[str] | None = None,
           steps: int | None = None) -> ExperimentSpec:  # fmt: skip
    """The experiment restricted / changed by command-line choices (unknown arms are a user error)."""
    chosen = dict(spec.arms)
    if arms:
        unknown = [a for a in arms if a not in spec.arms]
        if unknown:
            raise ConfigError(f"unknown arm(s) {unknown}; this experiment has {', '.join(spec.arms)}")
        chosen = {a: spec.arms[a] for a in arms}
    return spec.model_copy(update={"arms": chosen, "seeds": list(seeds) if seeds else spec.seeds,
                                   "steps": steps or spec.steps})  # fmt: skip


def _layers(preset: str, *layers: dict[str, Any]) -> SpearConfig:
    data = load_preset_dict(preset)
    for layer in layers:
        data = merge_layer(data, layer)
    return validate_config(data)


FIXED_BY_EXPERIMENT = ("model.path", "trainer.seed", "trainer.total_training_steps", "trainer.sft_warmup_steps",
                       "trainer.val_before_train", "trainer.resume", "trainer.run_name")  # fmt: skip


def _override_layer(overrides: Sequence[str]) -> dict[str, Any]:
    layer = parse_overrides(overrides)
    for key in FIXED_BY_EXPERIMENT:
        section, name = key.split(".")
        if name in layer.get(section, {}):
            raise ConfigError(f"{key} is set by the experiment (the warm-up weights, the seeds, --steps); set the "
                              f"model in the experiment's `common:` layer and use --seeds / --steps")  # fmt: skip
    return layer


def arm_config(spec: ExperimentSpec, arm: str, seed: int, warmup_model: Path | str,
               overrides: Sequence[str] = ()) -> SpearConfig:  # fmt: skip
    """One run's config: preset <- common <- arm layer <- CLI overrides <- what the experiment fixes
    (the warmed-up weights, the seed, the step count, no warm-up of its own, the step-0 eval shared)."""
    fixed = {
        "model": {"path": str(warmup_model)},
        "trainer": {"seed": seed, "total_training_steps": spec.steps, "sft_warmup_steps": 0,
                    "val_before_train": False, "resume": "auto", "run_name": f"{arm}-seed{seed}"},
    }  # fmt: skip
    return _layers(spec.arms[arm].preset, spec.common, spec.arms[arm].config, _override_layer(overrides), fixed)


def warmup_config(spec: ExperimentSpec, seed: int, overrides: Sequence[str] = ()) -> SpearConfig:
    """The warm-up run's config: the first arm's, with the warm-up layer (it trains SFT only)."""
    first = next(iter(spec.arms))
    fixed = {"trainer": {"seed": seed, "resume": "none"}}
    config = _layers(spec.arms[first].preset, spec.common, spec.arms[first].config, spec.warmup,
                     _override_layer(overrides), fixed)  # fmt: skip
    if config.trainer.sft_warmup_steps < 1:
        raise ConfigError("the experiment's warm-up needs trainer.sft_warmup_steps >= 1 (in its `warmup:` layer)")
    return config


def check_matched(spec: ExperimentSpec, overrides: Sequence[str] = ()) -> None:
    """Refuse arms that differ in what must be equal for a fair comparison (the model, the environment,
    the data sizes, the evaluation): a preset value the common layer forgot to fix."""
    keys = ("env", "data", "model", "trainer.val_episodes", "trainer.test_freq", "trainer.val_seed_offset",
            "rollout.val_temperature", "rollout.layout", "actor.lr", "actor.ppo_mini_batch_size", "actor.autocast")
    seen: dict[str, tuple[str, Any]] = {}
    for arm in spec.arms:
        dumped = arm_config(spec, arm, spec.seeds[0], "model", overrides).model_dump(mode="json")
        for key in keys:
            value: Any = dumped
            for part in key.split("."):
                value = value[part]
            first = seen.setdefault(key, (arm, value))
            if first[1] != value:
                raise ConfigError(f"arms {first[0]} and {arm} differ in {key} ({first[1]!r} vs {value!r}); set it "
                                  f"in the experiment's `common:` layer so every arm gets the same")  # fmt: skip


# -----------------------------------------------------------------------------------------------
# the stages (each in a process of its own)
# -----------------------------------------------------------------------------------------------
def run_warmup_stage(config: SpearConfig, run_dir: Path) -> dict[str, float]:
    """Train the SFT warm-up, evaluate it (step 0 of every arm) and save the weights as an HF folder."""
    from spear_engine.models import save_model
    from spear_engine.train.trainer import Trainer

    if run_dir.exists():  # an interrupted warm-up starts over (it has no checkpoints)
        shutil.rmtree(run_dir)
    trainer = Trainer(config, run_dir=run_dir, console=True)
    try:
        trainer.warmup()
        before = trainer.validate()
        if trainer.logger is not None:
            trainer.logger.log(0, before)
        save_model(trainer.backend.hf_model, trainer.tokenizer, run_dir / "model")
    finally:
        trainer.close()
    (run_dir / START_EVAL_FILE).write_text(json.dumps(before, indent=1))  # last: marks the stage done
    return before


def run_arm_stage(config: SpearConfig, run_dir: Path, start_eval: dict[str, float]) -> dict[str, Any]:
    """Train one arm from the warm-up weights; step 0 of its metrics is the shared warm-up evaluation."""
    from spear_engine.train.trainer import Trainer

    trainer = Trainer(config, run_dir=run_dir, console=True)
    first_step = trainer.global_step
    if first_step == 0 and trainer.logger is not None:
        trainer.logger.log(0, start_eval)
    record_machine(run_dir, first_step)
    start = time.perf_counter()
    trainer.fit()
    done = {"steps": trainer.global_step, "resumed_from": first_step, "wall_s": time.perf_counter() - start}
    (run_dir / DONE_FILE).write_text(json.dumps(done, indent=1))
    return done


def finished_steps(run_dir: Path) -> int:
    path = run_dir / DONE_FILE
    return int(json.loads(path.read_text())["steps"]) if path.is_file() else 0


# -----------------------------------------------------------------------------------------------
# the runner
# -----------------------------------------------------------------------------------------------
StageRunner = Callable[[list[str], Path], int]


def subprocess_stage(args: list[str], log: Path) -> int:
    """Run ``python -m spear_engine.experiment <args>`` with its output in ``log``; its exit status."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as out:
        return subprocess.call([sys.executable, "-m", "spear_engine.experiment", *args], stdout=out,
                               stderr=subprocess.STDOUT)  # fmt: skip


def run_experiment(name: str, out: str | Path, seeds: Sequence[int] | None = None, arms: Sequence[str] | None = None,
                   steps: int | None = None, overrides: Sequence[str] = (), stage_runner: StageRunner = subprocess_stage,
                   report: Callable[[str], None] = print) -> list[str]:  # fmt: skip
    """Run (or continue) every warm-up and every (seed, arm) run; returns the stages that failed (the
    others still run). Seed-major order, so a partial experiment has whole seeds to compare."""
    design = load_experiment(name)
    spec = select(design, seeds, arms, steps)
    check_matched(spec, overrides)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    # the record is the whole design (every arm and seed), not this call's selection: a run of one arm or seed
    # must not narrow what the folder says the experiment is
    whole = select(design, sorted(set(design.seeds) | set(spec.seeds)), None, steps)
    record = whole.model_dump(mode="json") | {"name": name, "overrides": list(overrides)}
    (folder / "experiment.yaml").write_text(yaml.safe_dump(record, sort_keys=False))
    failed: list[str] = []
    for seed in spec.seeds:
        if all(finished_steps(folder / "runs" / arm / f"seed{seed}") >= spec.steps for arm in spec.arms):
            continue  # nothing to run: a missing warm-up model is not needed
        warm = folder / "warmup" / f"seed{seed}"
        if not _warmup_ready(spec, seed, warm, overrides, stage_runner, report):
            failed.append(f"warmup seed {seed} (log {folder / 'warmup' / f'seed{seed}.log'})")
            report(f"[seed {seed}] warm-up FAILED: its arms are skipped; rerun to retry")
            continue
        start_eval = warm / START_EVAL_FILE
        for arm in spec.arms:
            run_dir = folder / "runs" / arm / f"seed{seed}"
            if finished_steps(run_dir) >= spec.steps:
                continue
            report(f"[seed {seed}] {arm}: {spec.steps} steps -> {run_dir}")
            config = arm_config(spec, arm, seed, (warm / "model").resolve(), overrides)
            config_file = _write_config(config, run_dir.parent / f"seed{seed}.yaml")
            began = time.perf_counter()
            status = stage_runner(["arm", str(config_file), str(run_dir), str(start_eval)], run_dir / "train.log")
            if status != 0:
                why = "killed by signal 9: out of memory?" if status == -9 else f"exit status {status}"
                failed.append(f"{arm} seed {seed} ({why}; log {run_dir / 'train.log'})")
                report(f"[seed {seed}] {arm}: FAILED ({why}); the other runs go on, rerun to resume it")
                continue
            report(f"[seed {seed}] {arm}: done in {(time.perf_counter() - began) / 60:.1f} min")
            if not spec.keep_final_checkpoint:
                shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return failed


def _warmup_ready(spec: ExperimentSpec, seed: int, warm: Path, overrides: Sequence[str], stage_runner: StageRunner,
                  report: Callable[[str], None]) -> bool:  # fmt: skip
    """Train the seed's warm-up unless its evaluation and weights are both there; False when that failed.

    The weights are never committed, so a fresh clone of a results folder has the evaluation only: the
    warm-up is trained again (same config and seed) and its evaluation compared with the recorded one, a
    warning naming what changed when they differ (the runs already recorded then started elsewhere)."""
    eval_file = warm / START_EVAL_FILE
    if eval_file.is_file() and (warm / "model" / "config.json").is_file():
        return True
    recorded = json.loads(eval_file.read_text()) if eval_file.is_file() else None
    if recorded is None:
        report(f"[seed {seed}] warm-up -> {warm}")
    else:
        report(f"[seed {seed}] the warm-up's weights ({warm / 'model'}, never committed) are missing: training it "
               "again from the same config and seed")  # fmt: skip
    config_file = _write_config(warmup_config(spec, seed, overrides), warm.parent / f"seed{seed}.yaml")
    if stage_runner(["warmup", str(config_file), str(warm)], warm.parent / f"seed{seed}.log") != 0:
        return False
    if recorded is not None:
        rebuilt = json.loads(eval_file.read_text())
        changed = [f"{k} {recorded[k]} -> {rebuilt.get(k)}" for k in sorted(recorded)
                   if not k.startswith("time/") and rebuilt.get(k) != recorded[k]]  # fmt: skip
        if changed:
            report(f"[seed {seed}] WARNING: the retrained warm-up evaluates differently from the recorded one "
                   f"({'; '.join(changed)}): other hardware or library versions? Runs already recorded for this "
                   "seed started from the old weights, new ones start from these")  # fmt: skip
        else:
            report(f"[seed {seed}] the retrained warm-up evaluates exactly as recorded")
    return True


def _write_config(config: SpearConfig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config_to_yaml(config))
    return path


def _read_config(path: str) -> SpearConfig:
    return validate_config(yaml.safe_load(Path(path).read_text()))


def main(argv: Sequence[str] | None = None) -> int:
    """The stage processes: ``warmup <config> <run_dir>`` and ``arm <config> <run_dir> <eval.json>``."""
    parser = argparse.ArgumentParser(prog="python -m spear_engine.experiment")
    sub = parser.add_subparsers(dest="stage", required=True)
    warm = sub.add_parser("warmup")
    warm.add_argument("config")
    warm.add_argument("run_dir")
    arm = sub.add_parser("arm")
    arm.add_argument("config")
    arm.add_argument("run_dir")
    arm.add_argument("start_eval")
    args = parser.parse_args(argv)
    config = _read_config(args.config)
    if args.stage == "warmup":
        run_warmup_stage(config, Path(args.run_dir))
    else:
        run_arm_stage(config, Path(args.run_dir), json.loads(Path(args.start_eval).read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
