"""The ``spear`` command.

User errors (a bad key, value, preset, file or argument) print one paragraph that names the problem
and the fix, and exit with status 2; stack traces are kept for bugs, or shown with ``--debug``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from spear_engine.config_loading import ConfigError
from spear_engine.errors import UserError, user_error_types  # both also importable from here

EPILOG = """\
examples:
  spear train                                  train the built-in default (SmolLM2-135M, spear, ALFWorld)
  spear train --preset grpo --env webshop trainer.total_training_steps=20 model.path=tiny
  spear eval --run-dir runs/spear-alfworld-...  success rate of the newest checkpoint on the eval split
  spear plot runs/spear-alfworld-...           write curves.png from the run's metrics
  spear experiment twc-cpu                     Dr.BoT / SPEAR / GRPO / ablations x 3 seeds -> results/twc-cpu
  spear experiment twc-cpu --seeds 3,4 trainer.val_seed_offset=500   other seeds, another held-out set
  spear experiment twc-cpu --status             what is done, what resumes, what is left
  spear compare results/twc-cpu                eval curves with seed bands + results.md table
  spear demo                                   run the algorithm core on the recorded batch (spear preset)
  spear demo --preset spear-official --steps 8
  spear demo --preset spear replay.replay_trigger=when_full_then_flush actor.clip_ratio_high=0.3
  spear presets                                list the presets
  spear presets spear                          show one preset, fully resolved
  spear presets --keys                         every config key, its default and what it does

Overrides are dotted key=value pairs (values parsed as YAML: true, null, 1e-6, [1, 2]).
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spear",
        description="spear_engine: SPEAR self-imitation RL for LLM agents (GRPO, GiGPO, Dr.BoT, SPEAR).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show full stack traces for every error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = sub.add_parser(
        "train",
        help="train an agent (rollouts, rewards, advantages, self-imitation, updates, checkpoints)",
        description="Train with a preset on an environment. Writes a run folder (config.yaml, metrics.jsonl, "
        "checkpoints/, curves.png). Rerunning the same command with the same trainer.run_name resumes it.",
        epilog="Common overrides: model.path=<hub id | path | smollm2-135m | tiny>, "
        "trainer.total_training_steps=N, data.train_batch_size=G (prompt groups), env.rollout.n=K (group "
        "size), env.max_steps=T, rollout.name=vllm, trainer.backend=deepspeed, trainer.logger=[jsonl,console,"
        "tensorboard].",
    )
    _add_config_arguments(train)
    train.add_argument("--env", help="environment: alfworld, webshop, math, twx (same as env.name=...)")
    train.add_argument("--run-dir", help="run folder (default: trainer.output_dir/trainer.run_name)")
    train.add_argument("--no-progress", action="store_true", help="no progress bar (metrics still go to JSONL)")

    evaluate = sub.add_parser("eval", help="success rate of a trained policy on the eval split")
    evaluate.add_argument("--run-dir", required=True, help="a run folder written by `spear train`")
    evaluate.add_argument("--checkpoint", help="a checkpoint folder (default: the newest valid one of the run)")
    evaluate.add_argument("--episodes", type=int, default=None, help="eval episodes (default trainer.val_episodes)")
    evaluate.add_argument("--greedy", action="store_true", help="greedy decoding instead of rollout.val_temperature")

    plot = sub.add_parser("plot", help="plot a run's curves as a PNG")
    plot.add_argument("run_dir", help="a run folder written by `spear train`")
    plot.add_argument("--out", help="output PNG (default <run_dir>/curves.png)")

    experiment = sub.add_parser(
        "experiment",
        help="a matched comparison of algorithm arms over seeds (resumable), then `spear compare`",
        description="Runs every arm of an experiment file for every seed from one shared SFT warm-up per seed, "
        "each run in its own process, into one results folder. Rerun the same command to continue: finished "
        "runs are skipped, interrupted ones resume from their newest checkpoint. Without a name: list them.",
    )
    experiment.add_argument("name", nargs="?", help="a built-in experiment (see the list) or an experiment YAML")
    experiment.add_argument("--out", help="results folder (default results/<name>)")
    experiment.add_argument("--seeds", help="comma-separated seeds instead of the file's (e.g. 3,4,5)")
    experiment.add_argument("--arms", help="comma-separated arms to run (default all)")
    experiment.add_argument("--steps", type=int, help="RL steps per run instead of the file's")
    experiment.add_argument("--status", action="store_true",
                            help="run nothing: say which runs are done, which resume (from which step), which start "
                                 "over, which warm-ups are trained again, and about how long the rest takes")  # fmt: skip
    experiment.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every run")

    compare = sub.add_parser("compare", help="compare an experiment's arms: curves with seed bands and a table")
    compare.add_argument("folder", help="a results folder written by `spear experiment`")
    compare.add_argument("--out", help="where compare.png / results.md / results.json go (default: the folder)")

    presets = sub.add_parser("presets", help="list presets, show one, or list every config key")
    presets.add_argument("name", nargs="?", help="a preset to show fully resolved, as YAML")
    presets.add_argument("--keys", action="store_true", help="list every config key with its default and doc")

    demo = sub.add_parser(
        "demo",
        help="run the algorithm core on a recorded batch of agent episodes and print its metrics",
        description="Runs rewards, Dr.BoT filters, advantages, self-imitation and the policy losses of the "
        "chosen preset on a recorded batch of ALFWorld-style episodes, for a few training steps, with "
        "synthetic policy log-probs (no model). Prints the metrics of every step.",
    )
    _add_config_arguments(demo)
    demo.add_argument("--steps", type=int, default=6, help="training steps to simulate (default 6)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the synthetic log-probs and replay draws")
    demo.add_argument("--batch", help="a recorded batch JSON file (default: the built-in one)")
    return parser


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="spear", help="preset name (default: spear; see `spear presets`)")
    parser.add_argument("--config", help="a YAML file applied on top of the preset (may say `inherit: <preset>`)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")


def _run(args: argparse.Namespace) -> int:
    if args.command == "presets":
        from spear_engine.commands import show_presets

        return show_presets(args.name, args.keys)
    if args.command == "train":
        from spear_engine.commands import run_train

        overrides = list(args.overrides) + ([f"env.name={args.env}"] if args.env else [])
        return run_train(args.preset, overrides, args.config, args.run_dir, not args.no_progress)
    if args.command == "eval":
        from spear_engine.commands import run_eval

        return run_eval(args.run_dir, args.checkpoint, args.episodes, args.greedy)
    if args.command == "plot":
        from spear_engine.commands import run_plot

        return run_plot(args.run_dir, args.out)
    if args.command == "experiment":
        from spear_engine.commands import run_experiment_command

        return run_experiment_command(args.name, args.out, _int_list(args.seeds, "--seeds"),
                                      args.arms.split(",") if args.arms else None, args.steps, args.overrides,
                                      status=args.status)  # fmt: skip
    if args.command == "compare":
        from spear_engine.commands import run_compare

        return run_compare(args.folder, args.out)
    if args.command == "demo":
        from spear_engine.commands import run_demo

        if args.steps < 1:
            raise UserError(f"--steps must be at least 1, got {args.steps}")
        return run_demo(args.preset, args.overrides, args.config, args.steps, args.seed, args.batch)
    raise UserError("no command given; try `spear train`, `spear demo` or `spear --help`")


def _int_list(text: str | None, flag: str) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise UserError(f"{flag} takes comma-separated integers, got {text!r}") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]  # overrides placed after an option: `--run-dir x a.b=1`
        elif extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as done:  # --help (0), or a bad argument: argparse printed the usage and the problem (2)
        return done.code if isinstance(done.code, int) else 2
    try:
        return _run(args)
    except (ConfigError, UserError, *user_error_types()) as err:
        if args.debug:
            raise
        print(f"spear: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
