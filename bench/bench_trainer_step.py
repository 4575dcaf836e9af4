"""Time of one training step with SPEAR vs the same step with GRPO, and the share of each stage.

Same data: every step is rolled out once (by the GRPO trainer, timed) and the same episodes go through
both trainers' post-rollout stages (rewards and filters, old log-probs, advantages, replay, update,
weight sync); each step time is the shared rollout time plus the trainer's own stages. The rollout is
identical work in both recipes (SPEAR's tool-call bonus is computed in the rewards stage), so the
difference is what SPEAR adds: the bonus, admission and draw, and the replay rows in the update.
Optional SFT warm-up first (``--sft-steps``, as the quickstart does) so the policy acts and sometimes
wins; SPEAR's replay buffer is filled by warm-up steps, so measured SPEAR steps carry a replay batch.
The trainers take turns in one process (these VMs drift between processes); medians of measured steps.

    python bench/bench_trainer_step.py --model smollm2-135m --env alfworld --sft-steps 8 --steps 3
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time

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


def shared_step(trainers: dict[str, Trainer]) -> dict[str, dict[str, float]]:
    """One step of every trainer on the same rollout (made by the first trainer's engine)."""
    first = next(iter(trainers.values()))
    start = time.perf_counter()
    episodes, timing = Trainer._rollout(first, first.global_step + 1)
    rollout_s = time.perf_counter() - start
    results = {}
    for name, trainer in trainers.items():
        trainer._rollout = lambda t, e=episodes, m=timing: (copy.deepcopy(e), dict(m))
        metrics = trainer.train_step()
        metrics["time/step"] += rollout_s - metrics["time/rollout"]
        metrics["time/rollout"] = rollout_s
        results[name] = metrics
    return results


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
    parser.add_argument("--sft-steps", type=int, default=0, help="SFT warm-up steps before RL (0: none)")
    parser.add_argument("override", nargs="*", help="extra key=value overrides for both presets")
    args = parser.parse_args()
    out = tempfile.mkdtemp(prefix="spear-bench-")
    extra = [f"trainer.sft_warmup_steps={args.sft_steps}", "trainer.sft_episodes=24"] if args.sft_steps else []
    args.override = [*extra, *args.override]
    grpo, spear = build("grpo", args, out), build("spear", args, out)
    if args.sft_steps:  # one warm-up, copied into the other trainer (same starting weights for both)
        print(f"SFT warm-up: {grpo.warmup()}", flush=True)
        spear.backend.hf_model.load_state_dict(grpo.backend.hf_model.state_dict())
        spear._sync_weights()
    trainers = {"grpo": grpo, "spear": spear}
    for _ in range(args.warmup):
        shared_step(trainers)
    runs: dict[str, list[dict[str, float]]] = {"spear": [], "grpo": []}
    for k in range(args.steps):
        for name, metrics in shared_step(trainers).items():
            runs[name].append(metrics)
            print(f"step {k} {name}: {metrics['time/step']:.1f} s, success {metrics.get('episode/success_rate', 0):.2f}, "
                  f"replay rows {metrics.get('actor/replay_rows', 0):.0f}", flush=True)  # fmt: skip
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
