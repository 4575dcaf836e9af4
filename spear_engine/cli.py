"""The ``spear`` command.

User errors (a bad key, value, preset, file or argument) print one paragraph that names the problem
and the fix, and exit with status 2; stack traces are kept for bugs, or shown with ``--debug``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from spear_engine.config_loading import ConfigError

EPILOG = """\
examples:
  spear demo                                   run the algorithm core on the recorded batch (spear preset)
  spear demo --preset spear-official --steps 8
  spear demo --preset spear replay.replay_trigger=when_full_then_flush actor.clip_ratio_high=0.3
  spear presets                                list the presets
  spear presets spear                          show one preset, fully resolved
  spear presets --keys                         every config key, its default and what it does

Overrides are dotted key=value pairs (values parsed as YAML: true, null, 1e-6, [1, 2]).
"""


class UserError(Exception):
    """An error the user can fix; printed without a stack trace."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spear",
        description="spear_engine: SPEAR self-imitation RL for LLM agents (GRPO, GiGPO, Dr.BoT, SPEAR).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show full stack traces for every error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

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
    if args.command == "demo":
        from spear_engine.commands import run_demo

        if args.steps < 1:
            raise UserError(f"--steps must be at least 1, got {args.steps}")
        return run_demo(args.preset, args.overrides, args.config, args.steps, args.seed, args.batch)
    raise UserError("no command given; try `spear demo` or `spear --help`")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except (ConfigError, UserError) as err:
        if args.debug:
            raise
        print(f"spear: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
