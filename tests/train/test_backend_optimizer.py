"""The torch backend's optimizer: torch's fused AdamW, the same update rule as the per-tensor loop."""

from __future__ import annotations

import torch

from spear_engine.train.backends import TorchBackend


def test_fused_adamw_steps_like_the_reference_loop() -> None:
    """Three clipped steps on fresh random gradients: the backend (fused AdamW) and a plain
    ``torch.optim.AdamW(foreach=False)`` with the same clipping end at the same weights and moments."""
    g = torch.Generator().manual_seed(7)
    model = torch.nn.Sequential(torch.nn.Linear(13, 7), torch.nn.Linear(7, 3, bias=False))
    reference = [p.detach().clone().requires_grad_() for p in model.parameters()]
    start = [p.detach().clone() for p in model.parameters()]
    backend = TorchBackend(model, lr=3e-2, weight_decay=0.1, grad_clip=1.0)
    assert backend.optimizer.param_groups[0]["fused"] is True
    optimizer = torch.optim.AdamW(reference, lr=3e-2, weight_decay=0.1, foreach=False)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=g) * 3 for p in reference]
        for p, q, grad in zip(backend.params, reference, grads, strict=True):
            p.grad, q.grad = grad.clone(), grad.clone()
        norm, stepped = backend.step()
        assert stepped and abs(norm - float(torch.nn.utils.clip_grad_norm_(reference, 1.0))) < 1e-5
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    for p, q, first in zip(backend.params, reference, start, strict=True):
        assert float((p.detach() - first).abs().max()) > 1e-2  # the steps really moved the weights
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(backend.optimizer.state[p]["exp_avg_sq"], optimizer.state[q]["exp_avg_sq"],
                                   rtol=1e-5, atol=1e-9)  # fmt: skip
