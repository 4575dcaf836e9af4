"""Multi-turn rollout throughput on real ALFWorld: HF ``generate`` vs in-process vLLM, 64 envs at once.

One :class:`AgentLoop` (one set of ALFWorld environments) is driven in turn by each engine, in the same
process, round-robin (these VMs drift 15-80 % between processes), each engine on fresh tasks (so the
game-translation cache never carries over). A round is a full rollout: reset every
env, then up to ``--turns`` turns of batched generation + env steps, exactly as a training step rolls out.
Reported per engine (medians over rounds): generated tokens/s over generation time and over the whole
rollout, env steps/s, the share of the rollout spent in env calls (resets and steps), and the env's own
speed per environment (steps/s and reset seconds, measured in the loop on one env).

    python bench/bench_agent_rollout.py                              # SmolLM2-135M, 64 envs, 3 turns
    python bench/bench_agent_rollout.py --model tiny --envs 8 --turns 2 --rounds 1   # quick check
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from bench_rollout import make_engines  # bench/ is the script's folder, so it is on sys.path

from spear_engine.envs.base import Action, make_env
from spear_engine.models import load_model, load_tokenizer
from spear_engine.rollout.agent_loop import AgentLoop, AgentLoopConfig
from spear_engine.rollout.engine import SamplingParams
from spear_engine.rollout.weight_sync import sync_weights


def env_speed(env_kwargs: dict, episodes: int = 8) -> tuple[float, float]:
    """(env steps/s, seconds per reset) of one ALFWorld env playing gold paths mixed with invalid actions."""
    env = make_env("alfworld", **env_kwargs)
    steps, step_s, reset_s = 0, 0.0, 0.0
    try:
        for seed in range(episodes):
            t0 = time.perf_counter()
            obs = env.reset(10_000 + seed, "train")
            reset_s += time.perf_counter() - t0
            for k, action in enumerate(env.gold_actions()):
                cmd = action if k % 3 else Action("command", obs.admissible_actions[0])  # some detours
                t0 = time.perf_counter()
                result = env.step(cmd)
                step_s += time.perf_counter() - t0
                steps += 1
                if result.done:
                    break
    finally:
        env.close()
    return steps / step_s, reset_s / episodes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--engines", default="hf,vllm")
    parser.add_argument("--envs", type=int, default=64, help="parallel environments (episodes per rollout)")
    parser.add_argument("--group", type=int, default=8, help="episodes per task seed (GRPO group size)")
    parser.add_argument("--turns", type=int, default=3, help="env.max_steps of the rollout")
    parser.add_argument("--response-len", type=int, default=32)
    parser.add_argument("--history", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--kv-cache-gb", type=float, default=3.0)
    args = parser.parse_args()
    if args.envs % args.group:
        raise SystemExit("--envs must be a multiple of --group")

    env_kwargs = {"max_steps": args.turns}
    tokenizer = load_tokenizer(args.model)
    trainer, _ = load_model(args.model, dtype=args.dtype)
    engines = make_engines(args.engines, args.model, trainer, args.dtype, args.kv_cache_gb, eos_token_ids=None)

    config = AgentLoopConfig(layout="step", history_length=args.history, max_turns=args.turns,
                             max_prompt_length=2048, max_response_length=args.response_len, step_timeout_s=None)  # fmt: skip
    loop = AgentLoop(next(iter(engines.values())), tokenizer, lambda: make_env("alfworld", **env_kwargs), "alfworld",
                     config)  # fmt: skip
    seeds_per_round = args.envs // args.group
    rows: dict[str, list[dict[str, float]]] = {name: [] for name in engines}
    try:
        counters = {"rollout/env_restarts": 0.0}
        for i in range(args.envs):  # build the envs outside the timed rounds (one-off, ~0.1 s each)
            loop._env(i, counters)
        warm = SamplingParams(max_new_tokens=4, temperature=1.0, seed=0)
        for engine in engines.values():
            engine.generate([list(tokenizer("Warm up the engine.")["input_ids"])] * 4, warm)
        for r in range(1, args.rounds + 1):
            for e, (name, engine) in enumerate(engines.items()):
                # fresh tasks for every engine and round: the game-translation cache starts cold each time
                seeds = [1000 * r + 100 * e + g for g in range(seeds_per_round)]
                synced = sync_weights(trainer, engine).seconds
                loop.engine = engine
                params = SamplingParams(max_new_tokens=args.response_len, temperature=1.0, seed=100 + r)
                start = time.perf_counter()
                episodes, timing = loop.run(seeds, args.group, params)
                wall = time.perf_counter() - start
                row = {"wall": wall, "generate": timing["time/generate"], "env": timing["time/env"],
                       "tokens": timing["rollout/generated_tokens"], "steps": timing["rollout/env_steps"],
                       "won": sum(e.success for e in episodes) / len(episodes), "sync": synced}  # fmt: skip
                print(f"round {r} {name}: {wall:.1f} s (generate {row['generate']:.1f} s, env {row['env']:.1f} s), "
                      f"{row['tokens']:.0f} tokens, {row['steps']:.0f} env steps, success {row['won']:.2f}",
                      flush=True)  # fmt: skip
                rows[name].append(row)
    finally:
        loop.close()
    steps_per_s, reset_s = env_speed(env_kwargs | {"max_steps": 50})

    def med(name: str, f) -> float:
        return statistics.median(f(row) for row in rows[name])

    print(f"\nmodel={args.model} dtype={args.dtype} envs={args.envs} (groups of {args.group}) turns={args.turns} "
          f"response<={args.response_len} rounds={args.rounds} threads={torch.get_num_threads()}")  # fmt: skip
    print(f"one ALFWorld env: {steps_per_s:.0f} steps/s, reset {reset_s:.3f} s (mean over 8 gold-path episodes)")
    print("| engine | rollout s | gen tokens/s (gen time) | gen tokens/s (rollout) | x hf | env steps/s | env share "
          "| weight sync s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    base = None
    for name in engines:
        rate = med(name, lambda r: r["tokens"] / r["generate"])
        base = rate if name == "hf" else base
        ratio = f"{rate / base:.2f}" if base else "-"
        print(f"| {name} | {med(name, lambda r: r['wall']):.1f} | {rate:.1f} | "
              f"{med(name, lambda r: r['tokens'] / r['wall']):.1f} | {ratio} | "
              f"{med(name, lambda r: r['steps'] / r['wall']):.1f} | {100 * med(name, lambda r: r['env'] / r['wall']):.1f} % | {med(name, lambda r: r['sync']):.3f} |")  # fmt: skip
    for engine in engines.values():
        engine.close()


if __name__ == "__main__":
    main()
