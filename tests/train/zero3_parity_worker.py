"""One rank of the ZeRO-3 parity test (run by torchrun from test_zero3_parity.py, or as one process).

Arguments: backend (torch | deepspeed), loss_agg_mode, output file, and optionally the layout of the
forward (padded | packed: rows concatenated without padding, ``actor.use_remove_padding``).

Every rank trains the tiny model's fused-head policy under DeepSpeed ZeRO-3 on *its half* of a fixed
synthetic batch (the same rows the single-process run sees whole), one PPO update with a global
mini-batch of 8 rows; rank 0 writes the gathered parameters and the per-rank loss metrics.
"""

from __future__ import annotations

import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch

from spear_engine.config import ActorConfig, PolicyLossConfig
from spear_engine.models import load_model
from spear_engine.train.policy import FusedHeadPolicy, SequenceBatch
from spear_engine.train.update import LossRows, update_actor

ROWS, PROMPT, RESPONSE = 8, 6, 5


def synthetic_rows(vocab: int) -> LossRows:
    g = torch.Generator().manual_seed(1234)
    prompts = torch.randint(3, vocab, (ROWS, PROMPT), generator=g)
    responses = torch.randint(3, vocab, (ROWS, RESPONSE), generator=g)
    lengths = torch.randint(2, RESPONSE + 1, (ROWS,), generator=g)
    attention = (torch.arange(RESPONSE)[None] < lengths[:, None]).long()  # right-padded responses
    response_mask = attention * (torch.rand(ROWS, RESPONSE, generator=g) > 0.2).long()  # some out of the loss
    response_mask[:, 0] = 1
    seqs = SequenceBatch.from_prompt_response(prompts, torch.ones_like(prompts), responses, attention)
    old = -torch.rand(ROWS, RESPONSE, generator=g) * 8 - 6
    adv = torch.randn(ROWS, 1, generator=g).expand(ROWS, RESPONSE) * response_mask
    return LossRows(seqs, old, adv.contiguous(), response_mask.float())


def shard(rows: LossRows, rank: int, world: int) -> LossRows:
    idx = torch.arange(rank, ROWS, world)
    return LossRows(rows.inputs.select(idx), rows.old_log_prob[idx], rows.advantages[idx], rows.loss_mask[idx])


def actor_config(world: int, mode: str) -> ActorConfig:
    return ActorConfig(ppo_mini_batch_size=ROWS // world, ppo_micro_batch_size_per_gpu=2, lr=1e-2, grad_clip=1e9,
                       entropy_coeff=0.01, loss_agg_mode=mode, clip_ratio_high=0.28,
                       policy_loss=PolicyLossConfig(loss_mode="vanilla"))


def run(backend_name: str, mode: str, out: str, layout: str = "padded") -> None:
    torch.manual_seed(0)
    model, _ = load_model("tiny")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    policy = FusedHeadPolicy(model, packed=layout == "packed")
    if backend_name == "deepspeed":
        from deepspeed.utils import safe_get_full_grad

        from spear_engine.train.backends import DeepSpeedBackend

        class Recording(DeepSpeedBackend):
            def step(self):  # the full (all-reduced) gradient of every parameter, before the optimizer step
                self.grads = {n: safe_get_full_grad(p).clone() for n, p in self.hf_model.named_parameters()}
                return super().step()

        backend = Recording(policy, lr=1e-2, weight_decay=0.01, grad_clip=1e9)
    else:
        from spear_engine.train.backends import TorchBackend

        class Recording(TorchBackend):
            def step(self):
                self.grads = {n: p.grad.clone() for n, p in self.hf_model.named_parameters()}
                return super().step()

        backend = Recording(policy, lr=1e-2, weight_decay=0.01, grad_clip=1e9)
    rows = synthetic_rows(model.config.vocab_size)
    rows = shard(rows, backend.rank, backend.world_size)
    metrics = update_actor(lambda idx, r: backend.forward(r.inputs.select(torch.as_tensor(idx))), backend,
                           actor_config(backend.world_size, mode), rows)
    gathered = [None] * backend.world_size
    if backend.world_size > 1:
        torch.distributed.all_gather_object(gathered, metrics)
    else:
        gathered = [metrics]
    from spear_engine.rollout.weight_sync import iter_named_weights

    params = {name: t.clone() for name, t in iter_named_weights(backend.hf_model, 64)}
    if backend.rank == 0:
        torch.save({"params": params, "before": before, "grads": backend.grads, "metrics": gathered}, out)


if __name__ == "__main__":
    run(*sys.argv[1:])
