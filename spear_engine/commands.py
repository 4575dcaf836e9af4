"""The bodies of the ``spear`` subcommands (the CLI module only parses arguments)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel

from spear_engine.config import SpearConfig
from spear_engine.config_loading import config_to_yaml, list_presets, load_config, load_preset_dict
from spear_engine.errors import UserError


def show_presets(name: str | None, keys: bool) -> int:
    """``spear presets``: list, show one resolved, or document every key."""
    if keys:
        for line in describe_keys(SpearConfig):
            print(line)
        return 0
    if name:
        print(config_to_yaml(load_config(name)), end="")
        return 0
    for preset in list_presets():
        print(f"{preset:16s} {load_preset_dict(preset).get('description', '')}")
    return 0


def describe_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """One line per key: dotted name, default, and the documentation written where it is declared."""
    lines = []
    defaults = model()
    for name, field in model.model_fields.items():
        dotted = f"{prefix}{name}"
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            lines.extend(describe_keys(annotation, f"{dotted}."))
            continue
        doc = " ".join((field.description or "").split())
        lines.append(f"{dotted} = {getattr(defaults, name)!r}" + (f"\n    {doc}" if doc else ""))
    return lines


def run_demo(
    preset: str, overrides: Sequence[str], config_file: str | None, steps: int, seed: int, batch: str | None
) -> int:
    """``spear demo``: the algorithm core on the recorded batch (see :mod:`spear_engine.demo`)."""
    from spear_engine.demo import run

    config = load_config(preset, overrides, config_file)
    if batch is not None:
        _check_recording(batch)
    run(config, steps=steps, seed=seed, recording=batch)
    return 0


def _check_recording(path: str) -> None:
    """A ``--batch`` file that is missing or not a recording is a user error, named before the demo starts."""
    from spear_engine.data import load_episodes

    if not Path(path).is_file():
        raise UserError(f"--batch {path}: no such file; pass a recording written by spear_engine.data.save_episodes, "
                        f"or leave --batch out to use the built-in one")  # fmt: skip
    try:
        load_episodes(path)
    except (ValueError, KeyError, TypeError, OSError, EOFError) as err:  # bad JSON / gzip / layout
        raise UserError(f"--batch {path} is not a recording of episodes ({type(err).__name__}: {err}); pass a file "
                        f"written by spear_engine.data.save_episodes, or leave --batch out") from err  # fmt: skip


def run_train(
    preset: str, overrides: Sequence[str], config_file: str | None, run_dir: str | None, progress: bool
) -> int:
    """``spear train``: build the trainer, train to the configured step count, plot the curves."""
    from spear_engine.plot import plot_run
    from spear_engine.train.trainer import Trainer

    config = load_config(preset, overrides, config_file)
    trainer = Trainer(config, run_dir=run_dir, console=progress)
    print(f"spear train: preset {config.preset}, env {config.env.name}, model {config.model.path}, "
          f"{config.trainer.total_training_steps} steps -> {trainer.run_dir}")  # fmt: skip
    trainer.fit()
    if trainer.rank == 0:
        png = plot_run(trainer.run_dir)
        print(f"spear train: done; metrics {trainer.run_dir / 'metrics.jsonl'}, curves {png}")
    return 0


def run_eval(run_dir: str, checkpoint: str | None, episodes: int | None, greedy: bool) -> int:
    """``spear eval``: load a run's config and checkpoint, report the eval-split success rate."""
    import json

    import yaml

    from spear_engine.config_loading import ConfigError, validate_config, yaml_problem
    from spear_engine.train.checkpoint import latest_checkpoint
    from spear_engine.train.trainer import Trainer

    folder = Path(run_dir)
    config_path = folder / "config.yaml"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} is not a run folder of `spear train` (no config.yaml)")
    try:
        raw = yaml.safe_load(config_path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{config_path} is damaged: not valid YAML ({yaml_problem(err)}); restore it from the "
                          f"run's copy or evaluate a checkpoint with a run folder that has a valid config.yaml") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{config_path} is damaged: expected a mapping of sections; restore it")
    config = validate_config(raw)
    target = Path(checkpoint) if checkpoint else latest_checkpoint(folder)
    if target is None:
        raise FileNotFoundError(f"{folder} has no valid checkpoint to evaluate; train it first (trainer.save_freq "
                                f"sets how often it saves) or pass --checkpoint <folder>")
    config = config.model_copy(update={"trainer": config.trainer.model_copy(update={"resume": str(target),
                                                                                   "logger": ["jsonl"]})})  # fmt: skip
    trainer = Trainer(config, run_dir=folder / "eval", console=False)
    try:
        result = trainer.evaluate(episodes, greedy=greedy)
    finally:
        trainer.close()
    print(json.dumps({"checkpoint": str(target), "step": trainer.global_step, **result}, indent=1))
    return 0


def run_plot(run_dir: str, out: str | None) -> int:
    from spear_engine.plot import plot_run

    print(plot_run(run_dir, out))
    return 0


def run_experiment_command(name: str | None, out: str | None, seeds: list[int] | None, arms: list[str] | None,
                           steps: int | None, overrides: Sequence[str], status: bool = False) -> int:  # fmt: skip
    """``spear experiment``: list the built-in experiments, or run / continue one and compare its arms, or
    (``status``) say where its results folder stands."""
    from spear_engine.experiment import list_experiments, load_experiment, run_experiment, select

    if name is None:
        for known in list_experiments():
            print(f"{known:16s} {load_experiment(known).description}")
        return 0
    if steps is not None and steps < 1:
        raise UserError(f"--steps must be at least 1, got {steps}")
    folder = Path(out) if out else Path("results") / Path(name).stem
    if status:
        from spear_engine.experiment_status import experiment_status

        print(experiment_status(select(load_experiment(name), seeds, arms, steps), folder))
        return 0
    failed = run_experiment(name, folder, seeds, arms, steps, overrides)
    if any((folder / "runs").glob("*/seed*/metrics.jsonl")):
        run_compare(str(folder), None)
    for stage in failed:
        print(f"spear experiment: failed: {stage}")
    return 1 if failed else 0


def run_compare(folder: str, out: str | None) -> int:
    """``spear compare``: curves of every arm with seed bands, and the results table."""
    from spear_engine.compare import compare_experiment

    for kind, path in compare_experiment(folder, out).items():
        print(f"spear compare: {kind} {path}")
    return 0
