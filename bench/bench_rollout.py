"""Rollout throughput: HF ``generate`` vs in-process vLLM on the same prompts, plus weight-sync time.

Both engines live in ONE process and take turns (round-robin, median over rounds): these VMs drift
15-80 % between processes, so cross-process numbers are not comparable. Each round samples with a
different seed. eos is ignored by default, so every row generates exactly ``--new-tokens`` tokens in
both engines (HF's batch would otherwise keep computing finished rows while vLLM drops them).

    python bench/bench_rollout.py                                # SmolLM2-135M, 64 x ~300 + 64, 3 rounds
    python bench/bench_rollout.py --model tiny --rounds 2        # quick check
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from spear_engine.models import load_model, load_tokenizer
from spear_engine.rollout.engine import SamplingParams
from spear_engine.rollout.hf import HFEngine
from spear_engine.rollout.weight_sync import sync_weights

_WORDS = [
    "cabinet", "drawer", "fridge", "microwave", "countertop", "sinkbasin", "apple", "mug", "knife", "pan", "lettuce",
    "tomato", "spoon", "go", "to", "take", "from", "put", "in", "clean", "heat", "cool", "open", "close", "examine",
    "look", "inventory", "desk", "lamp", "shelf", "the", "a", "you", "see", "is", "on", "your", "task", "nothing",
    "happens", "arrive", "at",
]


def make_prompts(tokenizer, n: int, length: int, seed: int = 0) -> list[list[int]]:
    """``n`` chat-formatted ALFWorld-like prompts of ``length`` ± 8 % tokens (varied, to exercise padding);
    each keeps the chat template's head and the assistant turn opener at the end, as real prompts do."""
    rng = random.Random(seed)
    prompts = []
    for i in range(n):
        target = max(8, int(length * rng.uniform(0.92, 1.08)))
        words = " ".join(rng.choice(_WORDS) for _ in range(target))
        text = f"Episode {i}. Observation: {words}\nChoose the next action."
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True)
        ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        excess = max(0, len(ids) - target)  # cut words out of the middle: template head and tail stay
        middle = len(ids) // 2
        prompts.append(ids[: middle - excess // 2 - excess % 2] + ids[middle + excess // 2:] if excess else ids)
    return prompts


def make_engines(
    names: str, model: str, trainer: torch.nn.Module, dtype: str, kv_cache_gb: float, eos_token_ids: list[int] | None
) -> dict[str, Any]:
    """The engines named in ``names`` (comma-separated ``hf`` / ``vllm``), each timed as it starts."""
    engines: dict[str, Any] = {}
    for name in names.split(","):
        start = time.perf_counter()
        if name == "hf":
            engines[name] = HFEngine(trainer, share=False, eos_token_ids=eos_token_ids)
        elif name == "vllm":
            from spear_engine.rollout.vllm import VLLMEngine

            engines[name] = VLLMEngine(model, dtype=dtype, kv_cache_gb=kv_cache_gb, eos_token_ids=eos_token_ids)
        else:
            raise SystemExit(f"unknown engine {name!r}")
        print(f"{name}: ready in {time.perf_counter() - start:.1f} s", flush=True)
    return engines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--engines", default="hf,vllm")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=300)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--kv-cache-gb", type=float, default=2.0)
    parser.add_argument("--keep-eos", action="store_true", help="stop rows at eos (default: ignore eos)")
    parser.add_argument("--sync-rounds", type=int, default=5)
    args = parser.parse_args()

    tokenizer = load_tokenizer(args.model)
    trainer, _ = load_model(args.model, dtype=args.dtype)
    engines = make_engines(args.engines, args.model, trainer, args.dtype, args.kv_cache_gb,
                           eos_token_ids=None if args.keep_eos else [])  # fmt: skip

    warm = SamplingParams(max_new_tokens=4, temperature=args.temperature, top_p=args.top_p, seed=0)
    for engine in engines.values():
        engine.generate(make_prompts(tokenizer, 4, args.prompt_len, seed=-1), warm)

    # One RL-like step per round: push the trainer's weights (this also resets vLLM's prefix cache),
    # then roll out a fresh batch (new prompts each round; the chat template's prefix is shared).
    seconds: dict[str, list[float]] = {name: [] for name in engines}
    tokens: dict[str, list[int]] = {name: [] for name in engines}
    sync: dict[str, list[float]] = {name: [] for name in engines}
    prompt_tokens = 0
    for r in range(args.rounds):
        prompts = make_prompts(tokenizer, args.batch, args.prompt_len, seed=r)
        prompt_tokens += sum(len(p) for p in prompts)
        params = SamplingParams(max_new_tokens=args.new_tokens, temperature=args.temperature, top_p=args.top_p,
                                seed=1000 + r)
        for name, engine in engines.items():
            sync[name].append(sync_weights(trainer, engine).seconds)
            start = time.perf_counter()
            generations = engine.generate(prompts, params)
            seconds[name].append(time.perf_counter() - start)
            tokens[name].append(sum(len(g.token_ids) for g in generations))
            print(f"round {r} {name}: {seconds[name][-1]:.2f} s, {tokens[name][-1]} tokens, "
                  f"sync {sync[name][-1]:.3f} s", flush=True)
    for _ in range(max(0, args.sync_rounds - args.rounds)):
        for name, engine in engines.items():
            sync[name].append(sync_weights(trainer, engine).seconds)

    print(f"\nmodel={args.model} dtype={args.dtype} batch={args.batch} "
          f"mean prompt tokens={prompt_tokens / (args.batch * args.rounds):.0f} new tokens={args.new_tokens} T={args.temperature} "
          f"top_p={args.top_p} rounds={args.rounds} threads={torch.get_num_threads()}")
    base = None
    print(f"| engine | median s | new tokens | tokens/s | x hf | weight sync s (median of {len(sync['hf' if 'hf' in sync else next(iter(sync))])}) |")
    print("|---|---|---|---|---|---|")
    for name in engines:
        median = statistics.median(seconds[name])
        rate = statistics.median(tokens[name]) / median
        base = rate if name == "hf" else base
        ratio = f"{rate / base:.2f}" if base else "-"
        print(f"| {name} | {median:.2f} | {statistics.median(tokens[name])} | {rate:.1f} | {ratio} | {statistics.median(sync[name]):.3f} |")
    for engine in engines.values():
        engine.close()


if __name__ == "__main__":
    main()
