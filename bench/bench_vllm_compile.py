"""vLLM on CPU, eager against compiled (``rollout.enforce_eager``): start-up, prefill and decode, one process.

Two engines of the same model side by side, one eager (the CPU default) and one compiled (vLLM's inductor
compile, ``enforce_eager=False``); each round times, on each engine in turn, the prefill of quickstart-like
prompts (8 prompts of a shared 300-token head and 120 tokens of their own: one generated token) and the decode
of 40 tokens for 8 sequences whose prompts are already in the prefix cache. Medians of ``--rounds``.

    python bench/bench_vllm_compile.py --model smollm2-135m --dtype bfloat16 --rounds 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from spear_engine.machine import cpu_model
from spear_engine.rollout.engine import SamplingParams
from spear_engine.rollout.vllm import VLLMEngine

PROMPTS, SHARED, OWN, NEW_TOKENS = 8, 300, 120, 40


def prompts(seed: int, vocab: int = 40_000) -> list[list[int]]:
    shared = torch.randint(100, vocab, (SHARED,), generator=torch.Generator().manual_seed(0)).tolist()
    own = torch.Generator().manual_seed(seed)
    return [shared + torch.randint(100, vocab, (OWN,), generator=own).tolist() for _ in range(PROMPTS)]


def timed(engine: VLLMEngine, batch: list[list[int]], new_tokens: int) -> float:
    start = time.perf_counter()
    out = engine.generate(batch, SamplingParams(max_new_tokens=new_tokens, temperature=1.0, seed=0))
    elapsed = time.perf_counter() - start
    assert all(len(g.token_ids) == new_tokens for g in out), "a sequence stopped early: the decode count is off"
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    engines, startup = {}, {}
    for name, eager in (("eager", True), ("compiled", False)):
        start = time.perf_counter()
        engines[name] = VLLMEngine(args.model, dtype=args.dtype, max_model_len=2048, enforce_eager=eager,
                                   eos_token_ids=[])  # fmt: skip
        startup[name] = time.perf_counter() - start
    prefill: dict[str, list[float]] = {name: [] for name in engines}
    decode: dict[str, list[float]] = {name: [] for name in engines}
    seed = 1
    for _ in range(args.rounds + 1):  # the first round warms both engines up and is dropped
        for name, engine in engines.items():
            prefill[name].append(timed(engine, prompts(seed), 1))
            cached = prompts(seed + 1)
            timed(engine, cached, 1)  # their prompts in the prefix cache: the next call decodes only
            decode[name].append(timed(engine, cached, NEW_TOKENS))
            seed += 2
    print(f"{cpu_model()}, {torch.get_num_threads()} threads; {args.model} in {args.dtype}; {PROMPTS} prompts "
          f"of {SHARED} shared + {OWN} own tokens; medians of {args.rounds} rounds")  # fmt: skip
    print(f"{'':34}{'eager':>10}{'compiled':>10}{'ratio':>8}")
    rows = {
        "start-up s (once per process)": startup,
        f"prefill of {PROMPTS} prompts s": {name: statistics.median(t[1:]) for name, t in prefill.items()},
        f"decode of {NEW_TOKENS} x {PROMPTS} tokens s": {name: statistics.median(t[1:]) for name, t in decode.items()},
    }
    for label, seconds in rows.items():
        eager_s, compiled_s = seconds["eager"], seconds["compiled"]
        print(f"{label:34}{eager_s:10.3f}{compiled_s:10.3f}{eager_s / compiled_s:7.2f}x")


if __name__ == "__main__":
    main()
