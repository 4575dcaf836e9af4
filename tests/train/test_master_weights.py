"""The torch backend on a bf16 module keeps fp32 master weights: gradients accumulate in fp32, the optimizer
steps the fp32 copies (a step far below bf16's spacing is not lost), and checkpoints hold the copies."""

from __future__ import annotations

import copy

import pytest
import torch

from spear_engine.train.backends import TorchBackend


class TiedToy(torch.nn.Module):
    """An embedding tied to the output head (as SmolLM2's) around one hidden layer."""

    def __init__(self, vocab: int = 11, width: int = 6) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.hidden = torch.nn.Linear(width, width)
        self.head = torch.nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.hidden(self.embed(tokens))))


def _toy(seed: int, dtype: torch.dtype = torch.bfloat16) -> TiedToy:
    torch.manual_seed(seed)
    return TiedToy().to(dtype)


def _loss(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(model(tokens[:, :-1]).float().flatten(0, 1), tokens[:, 1:].flatten())


def _batches(seed: int, count: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 11, (3, 5), generator=g) for _ in range(count)]


def test_fp32_module_has_no_master_copies() -> None:
    assert TorchBackend(_toy(0, torch.float32), lr=1e-3, weight_decay=0.0, grad_clip=1.0).master is None


def test_micro_batch_gradients_accumulate_in_fp32() -> None:
    """Two backwards through the backend: each master gradient is the fp32 sum of the two bf16 gradients
    autograd gives for the same micro-batches (the tied weight once, with both uses), and the bf16 module
    holds no gradient afterwards."""
    backend = TorchBackend(_toy(1), lr=1e-3, weight_decay=0.0, grad_clip=1.0)
    twin = _toy(1)
    first, second = _batches(2, 2)
    expected = [torch.zeros_like(p, dtype=torch.float32) for p in twin.parameters()]
    for tokens in (first, second):
        for total, grad in zip(expected, torch.autograd.grad(_loss(twin, tokens), list(twin.parameters())), strict=True):
            assert grad.dtype == torch.bfloat16
            total += grad.float()
        backend.backward(_loss(backend.module, tokens), boundary=False)
    assert len(backend.params) == len(expected) == 3  # embed (tied with the head), hidden weight and bias
    for p, master, total in zip(backend.params, backend.master.masters, expected, strict=True):
        assert p.grad is None and master.grad.dtype == torch.float32
        torch.testing.assert_close(master.grad, total, rtol=0, atol=0)


def test_small_steps_move_the_master_copies_like_fp32_adamw() -> None:
    """lr 1e-5 on weights of size ~0.5: each Adam step (about lr) is far below bf16's spacing there (2^-9), so
    an optimizer stepping the bf16 weights would round most of it away. The fp32 copies take the steps of a
    plain fp32 AdamW fed the same gradients, and the module holds their bf16 rounding."""
    model = _toy(3)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape) * 0.5)
    backend = TorchBackend(model, lr=1e-5, weight_decay=0.01, grad_clip=100.0)
    reference = [m.detach().clone().requires_grad_() for m in backend.master.masters]
    start = [r.detach().clone() for r in reference]
    optimizer = torch.optim.AdamW(reference, lr=1e-5, weight_decay=0.01, foreach=False)
    for tokens in _batches(4, 3):
        backend.backward(_loss(backend.module, tokens), boundary=True)
        for r, master in zip(reference, backend.master.masters, strict=True):
            r.grad = master.grad.clone()
        norm, stepped = backend.step()
        assert stepped and norm < 100.0  # no clipping: the reference needs none
        optimizer.step()
    for p, master, r, first in zip(backend.params, backend.master.masters, reference, start, strict=True):
        moved = (master.detach() - first).abs()
        assert 2e-5 < float(moved.max()) < 2**-12  # three real steps, each far below bf16's spacing at 0.5
        torch.testing.assert_close(master.detach(), r.detach(), rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(p.detach(), master.detach().to(torch.bfloat16), rtol=0, atol=0)
        assert master.grad is None and p.grad is None


def test_non_finite_gradient_skips_the_step_and_keeps_the_copies() -> None:
    backend = TorchBackend(_toy(5), lr=1e-2, weight_decay=0.0, grad_clip=1.0)
    before = [m.detach().clone() for m in backend.master.masters]
    backend.backward(_loss(backend.module, _batches(6, 1)[0]) * float("inf"), boundary=True)
    norm, stepped = backend.step()
    assert not stepped and not torch.isfinite(torch.tensor(norm))
    for master, first in zip(backend.master.masters, before, strict=True):
        assert master.grad is None
        torch.testing.assert_close(master.detach(), first, rtol=0, atol=0)


@pytest.mark.parametrize("steps_before_save", [0, 2])
def test_checkpoint_holds_the_fp32_copies_and_resumes_exactly(steps_before_save: int) -> None:
    """The backend's state has the fp32 copies under every name (the tied weight under both); loading it
    into a fresh bf16 backend restores the copies bit for bit, and the next step matches the original's."""
    backend = TorchBackend(_toy(7), lr=3e-3, weight_decay=0.01, grad_clip=1.0)
    batches = _batches(8, steps_before_save + 1)
    for tokens in batches[:steps_before_save]:
        backend.backward(_loss(backend.module, tokens), boundary=True)
        backend.step()
    state = backend.state_dict()
    assert set(state["model"]) == {"embed.weight", "hidden.weight", "hidden.bias", "head.weight"}
    assert all(t.dtype == torch.float32 for t in state["model"].values())
    torch.testing.assert_close(state["model"]["head.weight"], backend.master.masters[0].detach(), rtol=0, atol=0)
    saved = copy.deepcopy(state)  # what a checkpoint file holds: no tensor shared with the live run
    resumed = TorchBackend(_toy(9), lr=3e-3, weight_decay=0.01, grad_clip=1.0)
    resumed.load_state_dict(saved)
    for a, b, p in zip(backend.master.masters, resumed.master.masters, resumed.params, strict=True):
        torch.testing.assert_close(b.detach(), a.detach(), rtol=0, atol=0)
        torch.testing.assert_close(p.detach(), a.detach().to(torch.bfloat16), rtol=0, atol=0)
    for run in (backend, resumed):
        run.backward(_loss(run.module, batches[-1]), boundary=True)
        run.step()
    for a, b in zip(backend.master.masters, resumed.master.masters, strict=True):
        torch.testing.assert_close(b.detach(), a.detach(), rtol=0, atol=0)
