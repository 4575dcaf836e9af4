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

``--speedup``: the quickstart step (2 groups x 4 episodes, SmolLM2-135M, TextWorld-Commonsense) with
today's defaults against the path before the throughput work (``BASELINE``: HF generation, padded rows,
a separate old-log-prob pass, fp32) after one shared SFT warm-up; ``--new actor.autocast=bf16`` etc.
change the new side only. Every step each trainer rolls out with its own engine (timed: the engine is
part of the path), then both train on the *same* episodes (the new side's), so the training stages
compare on identical rows; ``--own-episodes``: each trains on its own rollout instead. ``--before K=V ...``
replaces ``BASELINE``, for an A/B of two settings of today's path (``--before`` alone: the defaults).

    python bench/bench_trainer_step.py --speedup --sft-steps 6 --warmup 1 --steps 3 --new actor.autocast=bf16
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from spear_engine.config_loading import load_config
from spear_engine.machine import cpu_model
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


def timed_rollout(trainer: Trainer) -> tuple[list, dict[str, float], float]:
    """(episodes, rollout metrics, seconds) of one rollout of ``trainer``'s engine with its current weights."""
    start = time.perf_counter()
    episodes, timing = Trainer._rollout(trainer, trainer.global_step + 1)
    return episodes, timing, time.perf_counter() - start


def shared_step(trainers: dict[str, Trainer]) -> dict[str, dict[str, float]]:
    """One step of every trainer on the same rollout (made by the first trainer's engine)."""
    episodes, timing, rollout_s = timed_rollout(next(iter(trainers.values())))
    results = {}
    for name, trainer in trainers.items():
        trainer._rollout = lambda t, e=episodes, m=timing: (copy.deepcopy(e), dict(m))
        metrics = trainer.train_step()
        metrics["time/step"] += rollout_s - metrics["time/rollout"]
        metrics["time/rollout"] = rollout_s
        results[name] = metrics
    return results


BASELINE = [  # the trainer path before the throughput work (issue 10), kept behind flags for this comparison
    "rollout.name=hf", "actor.use_remove_padding=false", "actor.use_dynamic_bsz=false",
    "actor.recompute_old_log_prob=always", "actor.autocast=none", "model.dtype=float32",
]  # fmt: skip


def speedup(args: argparse.Namespace, out: str) -> None:
    """The quickstart step on today's defaults vs the old path (``BASELINE``): same model and warm-up, each
    trainer's own engine timed, both trained on the same episodes (unless ``--own-episodes``); steps
    alternate in one process."""
    extra = [f"trainer.sft_warmup_steps={args.sft_steps}", "trainer.sft_episodes=24"] if args.sft_steps else []
    base = [f"trainer.output_dir={out}", "trainer.logger=[jsonl]", "trainer.test_freq=0", "trainer.save_freq=0",
            "trainer.total_training_steps=1000", f"model.path={args.model}", *extra, *args.override]  # fmt: skip
    before = BASELINE if args.before is None else args.before
    trainers = {
        "before": Trainer(load_config("quickstart", [*base, "trainer.run_name=before", *before]), console=False),
        "now": Trainer(load_config("quickstart", [*base, "trainer.run_name=now", *args.new]), console=False),
    }
    if args.sft_steps:  # one warm-up, copied into the other trainer (same starting weights for both)
        print(f"SFT warm-up: {trainers['before'].warmup()}", flush=True)
        trainers["now"].backend.load_weights(trainers["before"].backend.state_dict()["model"])
        trainers["now"]._sync_weights()
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in trainers}
    for k in range(args.warmup + args.steps):
        rollouts = {name: timed_rollout(trainer) for name, trainer in trainers.items()}
        for name, trainer in trainers.items():
            episodes, timing, _ = rollouts[name if args.own_episodes else "now"]
            own = rollouts[name][2]  # this trainer's own engine's time, whichever episodes it trains on
            trainer._rollout = lambda t, e=episodes, m=timing: (copy.deepcopy(e), dict(m))
            metrics = trainer.train_step()
            metrics["time/step"] += own - metrics["time/rollout"]
            metrics["time/rollout"] = own
            if k >= args.warmup:
                runs[name].append(metrics)
            print(f"step {k} {name}: {metrics['time/step']:.1f} s (rollout {metrics['time/rollout']:.1f} s, update "
                  f"{metrics['time/update']:.1f} s), {metrics.get('rollout/env_steps', 0):.0f} rows, "
                  f"{metrics.get('perf/real_tokens', 0):.0f} real tokens, success "
                  f"{metrics.get('episode/success_rate', 0):.2f}", flush=True)  # fmt: skip
    print(f"{cpu_model()}, {torch.get_num_threads()} threads; quickstart preset, model {args.model}; medians of "
          f"{args.steps} steps after {args.warmup}; load {os.getloadavg()[0]:.2f}")  # fmt: skip
    print(f"now = defaults {' '.join(args.new)}; before = defaults {' '.join(before)}; "
          f"{'each trains on its own rollout' if args.own_episodes else 'both train on the same episodes'}")
    keys = ["step", *STAGES]
    med = {n: {k: statistics.median(m.get(f"time/{k}", 0.0) for m in r) for k in keys} for n, r in runs.items()}
    print(f"{'stage':<20}{'before s':>10}{'now s':>10}{'before %':>10}{'now %':>9}")
    for stage in keys:
        b, n = med["before"][stage], med["now"][stage]
        print(f"{stage:<20}{b:>10.2f}{n:>10.2f}{100 * b / med['before']['step']:>9.1f}%{100 * n / med['now']['step']:>8.1f}%")
    for metric in ("perf/real_tokens", "perf/processed_tokens", "perf/padding_efficiency", "perf/prefix_sharing",
                   "perf/mfu", "perf/update_mfu", "rollout/env_steps"):
        b, n = (statistics.median(m.get(metric, 0.0) for m in runs[k]) for k in ("before", "now"))
        print(f"{metric:<28}{b:>12.3f}{n:>12.3f}")
    print(f"speed-up of the step: {med['before']['step'] / med['now']['step']:.2f}x")
    # per trained (sampled) token: perf/real_tokens counts every pass, so a separate old-log-prob pass doubles it
    per_token = {n: statistics.median(m["time/step"] / max(m["perf/trained_tokens_per_s"] * m["time/update"], 1.0)
                                      for m in r) for n, r in runs.items()}  # fmt: skip
    print(f"speed-up per trained token: {per_token['before'] / per_token['now']:.2f}x")
    for trainer in trainers.values():
        trainer.close()


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
    parser.add_argument("--speedup", action="store_true",
                        help="quickstart step now vs the old path (BASELINE overrides) instead of SPEAR vs GRPO")
    parser.add_argument("--new", nargs="*", default=[], help="--speedup: overrides of the 'now' trainer only")
    parser.add_argument("--before", nargs="*", default=None,
                        help="--speedup: overrides of the 'before' trainer instead of BASELINE (an A/B of two "
                             "settings of today's path; '--before' alone: the defaults)")
    parser.add_argument("--own-episodes", action="store_true",
                        help="--speedup: each trainer trains on its own rollout (default: both on the new side's)")
    parser.add_argument("override", nargs="*", help="extra key=value overrides for both presets")
    args = parser.parse_args()
    out = tempfile.mkdtemp(prefix="spear-bench-")
    if args.speedup:
        speedup(args, out)
        return
    extra = [f"trainer.sft_warmup_steps={args.sft_steps}", "trainer.sft_episodes=24"] if args.sft_steps else []
    args.override = [*extra, *args.override]
    grpo, spear = build("grpo", args, out), build("spear", args, out)
    if args.sft_steps:  # one warm-up, copied into the other trainer (same starting weights for both)
        print(f"SFT warm-up: {grpo.warmup()}", flush=True)
        spear.backend.load_weights(grpo.backend.state_dict()["model"])
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
