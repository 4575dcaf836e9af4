"""One AdamW step over a model's parameters: torch's per-tensor loop, foreach and fused implementations.

The torch backend uses the fused one (``spear_engine.train.backends.adamw``). Gradients are random, set
once; every implementation steps its own copy of the parameters, in turns, in one process; medians of
``--repeats`` steps after a first one (which allocates the moments).

    python bench/bench_optimizer_step.py --model smollm2-135m --repeats 7
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from spear_engine.machine import cpu_model
from spear_engine.models import load_model

VARIANTS = {"loop (torch default on CPU)": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    params = list(load_model(args.model)[0].parameters())
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(p.shape, generator=g) * 1e-3 for p in params]
    optimizers = {}
    for name, kwargs in VARIANTS.items():
        copies = [p.detach().clone().requires_grad_() for p in params]
        for copy, grad in zip(copies, grads, strict=True):
            copy.grad = grad
        optimizers[name] = torch.optim.AdamW(copies, lr=1e-5, weight_decay=0.01, **kwargs)
    times: dict[str, list[float]] = {name: [] for name in optimizers}
    for r in range(args.repeats + 1):
        for name, optimizer in optimizers.items():
            start = time.perf_counter()
            optimizer.step()
            if r:
                times[name].append(time.perf_counter() - start)
    count = sum(p.numel() for p in params)
    print(f"{cpu_model()}, {torch.get_num_threads()} threads; {args.model}: {len(params)} tensors, {count / 1e6:.1f}M "
          f"fp32 parameters; medians of {args.repeats} steps after one")  # fmt: skip
    loop = statistics.median(times["loop (torch default on CPU)"])
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:<30}{median:>8.3f} s{loop / median:>8.2f}x")


if __name__ == "__main__":
    main()
