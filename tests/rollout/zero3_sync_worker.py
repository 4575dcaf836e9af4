"""One rank of the 2-rank ZeRO-3 weight-sync test (run by torchrun from test_rollout_engines.py).

Every rank: tiny model under ZeRO-3 (persistence threshold 0, so every parameter is partitioned),
one AdamW step, then ``sync_weights`` (all ranks enter each bucket's gather; only rank 0 has an
engine). Rank 0 compares its HF engine's greedy log-probs with the ZeRO-3 model's teacher-forced
ones (a collective forward on both ranks) and writes the result as JSON.
"""

from __future__ import annotations

import json
import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed
import torch

from spear_engine.models import load_model
from spear_engine.rollout.engine import SamplingParams
from spear_engine.rollout.hf import HFEngine
from spear_engine.rollout.weight_sync import sync_weights


def teacher_forced(model, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1:-1].float()
    return torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(tokens)[:, None])[:, 0]


def main(model_path: str, out: str) -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    model, _ = load_model(model_path)
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
              "zero_force_ds_cpu_optimizer": False}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=3e-2),
                                      config=config)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8] * 4])
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()
    embed = engine.module.model.embed_tokens.weight

    rollout = HFEngine.from_pretrained(model_path) if rank == 0 else None
    prompt = [7, 8, 9, 10, 11, 12]
    greedy = SamplingParams(max_new_tokens=16, temperature=0.0)
    # the sequence to score is chosen by rank 0 and shared, so both ranks run the same forward
    tokens = [rollout.generate([prompt], greedy)[0].token_ids] if rank == 0 else [None]
    torch.distributed.broadcast_object_list(tokens, src=0)
    reference = teacher_forced(engine, prompt, tokens[0])
    gap_before = (torch.tensor(rollout.generate([prompt], greedy)[0].logprobs) - reference).abs().max().item() \
        if rank == 0 else 0.0

    stats = sync_weights(engine, rollout, bucket_mb=0.5)

    tokens = [rollout.generate([prompt], greedy)[0].token_ids] if rank == 0 else [None]
    torch.distributed.broadcast_object_list(tokens, src=0)
    reference = teacher_forced(engine, prompt, tokens[0])
    if rank == 0:
        after = rollout.generate([prompt], greedy)[0]
        result = {"gap_before": gap_before, "gap_after": (torch.tensor(after.logprobs) - reference).abs().max().item(),
                  "buckets": stats.buckets, "tensors": stats.tensors, "seconds": stats.seconds,
                  "partition_numel": int(embed.ds_tensor.numel()), "full_numel": int(embed.ds_numel)}
        with open(out, "w") as handle:
            json.dump(result, handle)
    torch.distributed.barrier()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
