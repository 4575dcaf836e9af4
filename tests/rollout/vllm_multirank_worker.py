"""One rank of the 2-rank vLLM test (run by torchrun from test_vllm_multirank.py).

Every rank: torch.distributed (gloo) as DeepSpeed initialises it, the tiny model under ZeRO-3 (every
parameter partitioned), its own in-process ``VLLMEngine`` (seed = rank), then:

1. the engine's world is vLLM's own (size 1) and the trainer's group still all-reduces over both ranks;
2. each rank generates for its own prompts, rank 0 more often than rank 1 (a collective inside
   ``generate`` would hang); the greedy log-probs match the ZeRO-3 model's teacher-forced ones;
3. one AdamW step changes the weights: the engine is now stale (large gap);
4. ``load_weights`` from ``iter_named_weights`` (every rank gathers bucket by bucket, each feeds its own
   engine): the log-probs match the new model again, and the greedy tokens are its argmax.

Both orders of start-up: rank 0 builds its engine before ``init_distributed`` (no trainer group yet; the
launcher's ``WORLD_SIZE`` says it is one of several), rank 1 after it (the trainer's order). The ranks'
results are gathered and rank 0 writes them as JSON.
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed
import torch

from spear_engine.models import load_model
from spear_engine.rollout.engine import SamplingParams
from spear_engine.rollout.vllm import VLLMEngine
from spear_engine.rollout.weight_sync import iter_named_weights

GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0)
PROMPTS = {0: [[5, 9, 14, 3, 27, 8], [40, 41, 42, 43]], 1: [[100, 7, 7, 31, 2, 66, 12, 90], [61, 3]]}


def scored(model, prompts: list[list[int]], generations) -> tuple[float, bool]:
    """(max |engine log-prob - model log-prob| over all tokens, every greedy token is the model's argmax
    where the top two differ by more than 1e-4). One forward per prompt: every rank has as many prompts,
    so the ZeRO-3 gathers stay in step."""
    gap, argmax_ok = 0.0, True
    for prompt, generation in zip(prompts, generations, strict=True):
        tokens = generation.token_ids
        ids = torch.tensor([prompt + tokens])
        with torch.no_grad():
            logits = model(ids).logits[0, len(prompt) - 1 : -1].float()
        logp = torch.log_softmax(logits, dim=-1)
        picked = logp.gather(1, torch.tensor(tokens)[:, None])[:, 0]
        gap = max(gap, (torch.tensor(generation.logprobs) - picked).abs().max().item())
        top2 = logp.topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > 1e-4
        argmax_ok &= bool((logp.argmax(-1) == torch.tensor(tokens))[clear].all())
    return gap, argmax_ok


def main(model_path: str, out: str) -> None:
    engine_first = os.environ["RANK"] == "0"
    start = time.perf_counter()
    rollout = VLLMEngine(model_path, seed=0, kv_cache_gb=0.1) if engine_first else None
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    model, _ = load_model(model_path)
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "zero_force_ds_cpu_optimizer": False,
    }
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-2)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    if rollout is None:
        rollout = VLLMEngine(model_path, seed=rank, kv_cache_gb=0.1)
    built = time.perf_counter() - start

    from vllm.distributed.parallel_state import get_tp_group, get_world_group

    total = torch.tensor([float(rank + 1)])
    torch.distributed.all_reduce(total)  # the trainer's group, after the engine exists
    result = {
        "rank": rank,
        "engine_first": engine_first,
        "world": world,
        "vllm_world": get_world_group().world_size,
        "vllm_tp": get_tp_group().world_size,
        "all_reduce": total.item(),
        "build_s": built,
    }

    prompts = PROMPTS[rank]
    for _ in range(2 if rank == 0 else 0):  # unequal calls per rank: generate must not be collective
        rollout.generate(prompts, SamplingParams(max_new_tokens=6, temperature=1.0, seed=3))
    before = rollout.generate(prompts, GREEDY)
    result["gap_initial"], result["argmax_initial"] = scored(engine, prompts, before)

    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8] * 4]) + 10 * rank  # each rank trains on its own row
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()
    result["gap_stale"], _ = scored(engine, prompts, before)

    rollout.sleep()  # a no-op on CPU; on GPU load_weights wakes it up
    sync_start = time.perf_counter()
    rollout.load_weights(iter_named_weights(engine, bucket_mb=0.5))
    result["sync_s"] = time.perf_counter() - sync_start
    after = rollout.generate(prompts, GREEDY)
    result["gap_synced"], result["argmax_synced"] = scored(engine, prompts, after)
    result["changed"] = any(
        a.token_ids != b.token_ids or a.logprobs != b.logprobs for a, b in zip(after, before, strict=True)
    )
    embed = engine.module.model.embed_tokens.weight
    result["partitioned"] = int(embed.ds_tensor.numel()) < int(embed.ds_numel)

    total = torch.tensor([float(rank + 1)])
    torch.distributed.all_reduce(total)
    result["all_reduce_end"] = total.item()
    results = [None] * world
    torch.distributed.all_gather_object(results, result)
    if rank == 0:
        with open(out, "w") as handle:
            json.dump(results, handle)
    torch.distributed.barrier()
    rollout.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
