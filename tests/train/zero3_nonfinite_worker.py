"""Worker for test_zero3_nonfinite.py (run under torchrun, 2 ranks, gloo).

A ZeRO-3 step whose loss is finite but whose gradients are not (on one rank only) must be skipped on
every rank with the weights and the optimizer state unchanged; the next good step must train.
A test for the backend's reliance on DeepSpeed's invalid-norm skip.
Rank 0 writes a JSON verdict.
"""

from __future__ import annotations

import json
import sys

import torch

from spear_engine.models import load_model
from spear_engine.rollout.weight_sync import iter_named_weights
from spear_engine.train.backends import DeepSpeedBackend
from spear_engine.train.policy import FusedHeadPolicy, SequenceBatch


def batch(vocab: int, rank: int) -> SequenceBatch:
    g = torch.Generator().manual_seed(100 + rank)
    prompts = torch.randint(3, vocab, (2, 6), generator=g)
    responses = torch.randint(3, vocab, (2, 5), generator=g)
    return SequenceBatch.from_prompt_response(prompts, torch.ones_like(prompts), responses, torch.ones_like(responses))


def weights(backend: DeepSpeedBackend) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in iter_named_weights(backend.hf_model, 1.0)}


def optimizer_state(backend: DeepSpeedBackend) -> list[torch.Tensor]:
    state = backend.engine.optimizer.optimizer.state
    return [t.detach().clone() for s in state.values() for t in s.values() if torch.is_tensor(t)]


def step(backend: DeepSpeedBackend, data: SequenceBatch, poison: bool) -> tuple[float, bool]:
    logp, _ = backend.forward(data)
    if poison:  # a finite loss whose gradient is inf everywhere
        logp.register_hook(lambda grad: torch.full_like(grad, float("inf")))
    loss = -logp.mean()
    assert torch.isfinite(loss)
    backend.backward(loss, boundary=True)
    return backend.step()


def main(out: str) -> None:
    torch.manual_seed(0)
    model, _ = load_model("tiny")
    backend = DeepSpeedBackend(FusedHeadPolicy(model), lr=1e-2, weight_decay=0.0, grad_clip=1.0)
    data = batch(model.config.vocab_size, backend.rank)
    first = step(backend, data, poison=False)
    w0, s0 = weights(backend), optimizer_state(backend)
    skipped = step(backend, data, poison=backend.rank == 1)
    w1, s1 = weights(backend), optimizer_state(backend)
    after = step(backend, data, poison=False)
    w2 = weights(backend)
    verdict = {
        "first_ok": first[1],
        "skipped_ok": skipped[1],
        "weights_unchanged": all(torch.equal(w0[k], w1[k]) for k in w0),
        "state_unchanged": len(s0) > 0 and len(s0) == len(s1) and all(torch.equal(a, b) for a, b in zip(s0, s1)),
        "next_ok": after[1],
        "next_moved": any(not torch.equal(w1[k], w2[k]) for k in w1),
        "finite_after": all(bool(torch.isfinite(t).all()) for t in w2.values()),
    }
    gathered = [None] * backend.world_size
    torch.distributed.all_gather_object(gathered, verdict)
    if backend.rank == 0:
        with open(out, "w") as f:
            json.dump(gathered, f)


if __name__ == "__main__":
    main(sys.argv[1])
