"""Attention of shared-prefix rows on CPU: the per-row SDPA call against ``eager_causal_attention``.

A packed forward with shared prefixes (``actor.share_prefixes``) attends row by row: a row's queries are
its own new tokens, its keys its whole path. This times one layer's attention, forward and backward, over
the rows of quickstart-like groups (SmolLM2-135M heads: 9 query heads, 3 key/value heads of 64), in two
input dtypes: bf16 throughout (a bf16 model) and the autocast case (fp32 queries and keys from the rotary
embedding, bf16 values). Both paths run in the same process, alternating; medians of ``--repeats``.

    python bench/bench_packed_attention.py --repeats 7
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from spear_engine.machine import cpu_model
from spear_engine.train.packed_attention import _causal_attention, eager_causal_attention
from spear_engine.train.prefix_tree import pack_prefix_tree

HEADS, KV_HEADS, DIM, LAYERS = 9, 3, 64, 30


def group_rows(seed: int, groups: int, per_group: int) -> tuple[list[int], list[int]]:
    """(query lengths, key lengths) of the prefix tree of step-layout-like rows: each group shares a task
    prompt of ~250 tokens, its rows branch after it at random depths and add a response of 10-60 tokens."""
    rng = random.Random(seed)
    rows = []
    for _ in range(groups):
        task = [rng.randrange(100, 50_000) for _ in range(rng.randrange(200, 280))]
        for _ in range(per_group):
            history = task[: len(task) - rng.randrange(0, 60)] + [rng.randrange(100, 50_000) for _ in range(rng.randrange(0, 120))]
            rows.append(history + [rng.randrange(100, 50_000) for _ in range(rng.randrange(10, 60))])
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), True
    tree = pack_prefix_tree(ids, mask)
    assert tree is not None
    return torch.diff(tree["cu_seqlens"]).tolist(), torch.diff(tree["cu_seqlens_k"]).tolist()


def one_layer(path: str, q_lengths: list[int], k_lengths: list[int], qk_dtype: torch.dtype, seed: int) -> float:
    """Seconds of one layer's attention over every row, forward and backward."""
    g = torch.Generator().manual_seed(seed)
    tensors = []
    for lq, lk in zip(q_lengths, k_lengths, strict=True):
        q = torch.randn(1, HEADS, lq, DIM, generator=g).to(qk_dtype).requires_grad_()
        k = torch.randn(1, KV_HEADS, lk, DIM, generator=g).to(qk_dtype).requires_grad_()
        v = torch.randn(1, KV_HEADS, lk, DIM, generator=g).to(torch.bfloat16).requires_grad_()
        tensors.append((q, k, v))
    start = time.perf_counter()
    outs = []
    for q, k, v in tensors:
        if path == "eager":
            outs.append(eager_causal_attention(q, k, v, None))
        else:  # what the packed attention ran before: one SDPA call (repeated key/value heads), bf16 inputs
            outs.append(_causal_attention(q.to(torch.bfloat16), k.to(torch.bfloat16), v, 0.0, None))
    torch.cat(outs, 2).float().square().sum().backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--groups", type=int, default=2)
    parser.add_argument("--per-group", type=int, default=20)
    args = parser.parse_args()
    q_lengths, k_lengths = group_rows(0, args.groups, args.per_group)
    print(f"{cpu_model()}, {torch.get_num_threads()} threads; {len(q_lengths)} rows with queries, "
          f"{sum(q_lengths)} queries, {sum(k_lengths)} keys; one layer fwd+bwd, medians of {args.repeats}")  # fmt: skip
    print(f"{'inputs':<28}{'sdpa ms':>10}{'eager ms':>10}{'speed-up':>10}{'x 30 layers, s':>18}")
    for name, qk_dtype in [("bf16", torch.bfloat16), ("autocast (fp32 q/k, bf16 v)", torch.float32)]:
        times: dict[str, list[float]] = {"sdpa": [], "eager": []}
        for r in range(args.repeats + 1):
            for path in times:
                seconds = one_layer(path, q_lengths, k_lengths, qk_dtype, seed=r)
                if r:  # the first round warms up
                    times[path].append(seconds)
        sdpa, eager = (statistics.median(times[p]) for p in ("sdpa", "eager"))
        print(f"{name:<28}{1e3 * sdpa:>10.1f}{1e3 * eager:>10.1f}{sdpa / eager:>9.2f}x"
              f"{LAYERS * sdpa:>9.2f} -> {LAYERS * eager:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
