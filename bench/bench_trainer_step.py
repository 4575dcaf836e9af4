"""Time of one training step with SPEAR vs the same step with GRPO, and the share of each stage.

Both trainers start from the same weights and roll out the same seeds; SPEAR's replay buffer is
filled by warm-up steps first, so every measured SPEAR step carries a replay batch. The two trainers
take turns in one process (these VMs drift between processes); medians over the measured steps.

    python bench/bench_trainer_step.py --model smollm2-135m --env alfworld --steps 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from spear_engine.config_loading import load_config
from spear_engine.train.trainer import Trainer

STAGES = ["rollout", "rewards_filters", "old_log_prob", "advantages_replay", "update", "weight_sync", "replay_update"]


def build(preset: str, args: argparse.Namespace, out: str) -> Trainer:
    overrides = [
        f"model.path={args.model}", f"env.name={args.env}", f"env.max_steps={args.turns}",
        f"data.train_batch_size={args.groups}", f"env.rollout.n={args.group_size}",
        f"data.max_response_length={args.response}", "data.max_prompt_length=2048", "env.history_length=1",
        "actor.ppo_mini_batch_size=64", "actor.ppo_micro_batch_size_per_gpu=4", "trainer.logger=[jsonl]",
        "trainer.test_freq=0", "trainer.save_freq=0", f"trainer.output_dir={out}", f"trainer.run_name={preset}",
        "trainer.total_training_steps=1000", "rollout.rollout_filter_ratio=1.0", "actor.lr=1e-5",
        # every generated row trains in both presets, so the update cost compares like for like
        "algorithm.filter_incomplete_responses=false", "algorithm.filter_overlong_responses=false",
        "replay.max_replay_loss_steps=1", *args.override,
    ]  # fmt: skip
    return Trainer(load_config(preset, overrides), console=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--env", default="alfworld")
    parser.add_argument("--groups", type=int, default=2)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--response", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=2, help="SPEAR steps that fill the buffer first")
    parser.add_argument("--steps", type=int, default=3, help="measured steps per preset")
    parser.add_argument("override", nargs="*", help="extra key=value overrides for both presets")
    args = parser.parse_args()
    out = tempfile.mkdtemp(prefix="spear-bench-")
    spear, grpo = build("spear", args, out), build("grpo", args, out)
    for _ in range(args.warmup):
        spear.train_step()
        grpo.train_step()
    runs: dict[str, list[dict[str, float]]] = {"spear": [], "grpo": []}
    for _ in range(args.steps):
        for name, trainer in (("grpo", grpo), ("spear", spear)):
            runs[name].append(trainer.train_step())
    print(f"model {args.model}, env {args.env}, {args.groups}x{args.group_size} episodes of <= {args.turns} turns, "
          f"{args.response} new tokens/turn; medians of {args.steps} steps; load {os.getloadavg()[0]:.2f}")  # fmt: skip
    print(f"{'stage':<20}{'grpo s':>10}{'spear s':>10}{'grpo %':>9}{'spear %':>9}")
    med = {n: {s: statistics.median(m.get(f"time/{s}", 0.0) for m in r) for s in [*STAGES, "step"]} for n, r in runs.items()}
    for stage in STAGES:
        g, s = med["grpo"][stage], med["spear"][stage]
        print(f"{stage:<20}{g:>10.2f}{s:>10.2f}{100 * g / med['grpo']['step']:>8.1f}%{100 * s / med['spear']['step']:>8.1f}%")
    g, s = med["grpo"]["step"], med["spear"]["step"]
    replayed = statistics.median(m.get("actor/replay_rows", 0.0) for m in runs["spear"])
    rows = statistics.median(m.get("rollout/env_steps", 0.0) for m in runs["spear"])
    print(f"{'step':<20}{g:>10.2f}{s:>10.2f}")
    print(f"SPEAR overhead: {100 * (s - g) / g:+.1f}% of the GRPO step time "
          f"(replay rows per step: {replayed:.0f}, on-policy rows: {rows:.0f})")  # fmt: skip
    spear.close()
    grpo.close()


if __name__ == "__main__":
    main()
