"""token_ops: masked reductions, entropy and log-probs (hand cases, float64 oracle, gradcheck)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spear_engine.algorithms.token_ops import (
    entropy_from_logits,
    logprobs_from_logits,
    masked_mean,
    masked_sum,
    masked_var,
)

VALUES = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
MASK = torch.tensor([[1, 0, 1], [0, 0, 1]], dtype=torch.bool)


def test_masked_sum_and_mean_by_hand():
    assert masked_sum(VALUES, MASK).item() == 10.0
    assert masked_sum(VALUES, MASK, axis=-1).tolist() == [4.0, 6.0]
    assert masked_mean(VALUES, MASK).item() == pytest.approx(10 / 3, rel=1e-6)
    assert masked_mean(VALUES, MASK.float(), axis=0).tolist() == pytest.approx([1.0, 0.0, 4.5], rel=1e-6)


def test_masked_sum_ignores_nan_outside_mask_and_weights_inside():
    values = VALUES.clone()
    values[0, 1] = float("nan")
    values[1, 0] = float("inf")
    assert masked_sum(values, MASK).item() == 10.0
    weights = torch.tensor([[0.5, 0.0, 2.0], [0.0, 0.0, 1.0]])
    assert masked_sum(values, weights).item() == pytest.approx(0.5 + 6.0 + 6.0)


def test_masked_mean_of_empty_mask_is_zero():
    assert masked_mean(VALUES, torch.zeros_like(MASK)).item() == 0.0


def test_masked_var_by_hand():
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 100.0])
    mask = torch.tensor([1, 1, 1, 1, 0])
    assert masked_var(values, mask).item() == pytest.approx(5 / 3, rel=1e-6)
    assert masked_var(values, mask, unbiased=False).item() == pytest.approx(1.25, rel=1e-6)


@pytest.mark.parametrize("selected", [0, 1])
def test_masked_var_rejects_too_few_elements(selected):
    mask = torch.zeros(4)
    mask[:selected] = 1
    with pytest.raises(ValueError):
        masked_var(torch.arange(4.0), mask)


def test_entropy_by_hand():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [math.log(3.0), 0.0, -1e4, -1e4]])
    expected = [math.log(4.0), -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))]
    assert entropy_from_logits(logits).tolist() == pytest.approx(expected, rel=1e-6)


def test_logprobs_by_hand():
    logits = torch.log(torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])) + 7.0
    labels = torch.tensor([2, 0])
    assert logprobs_from_logits(logits, labels).tolist() == pytest.approx(
        [math.log(0.5), math.log(1 / 6)], rel=1e-6
    )


def _oracle_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits.double(), dim=-1)
    return logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def _oracle_entropy(logits: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits.double(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("chunk_size", [None, 1, 3, 1000])
def test_random_against_float64_oracle_values_and_grads(chunk_size):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 5, 97, generator=gen) * 3
    labels = torch.randint(0, 97, (4, 5), generator=gen)
    upstream = torch.randn(4, 5, generator=gen)
    for ours_fn, oracle_fn in (
        (
            lambda x: logprobs_from_logits(x, labels, chunk_size=chunk_size),
            lambda x: _oracle_logprobs(x, labels),
        ),
        (lambda x: entropy_from_logits(x, chunk_size=chunk_size), _oracle_entropy),
    ):
        x = logits.clone().requires_grad_(True)
        ours = ours_fn(x)
        (ours * upstream).sum().backward()
        x64 = logits.double().requires_grad_(True)
        ref = oracle_fn(x64)
        (ref * upstream.double()).sum().backward()
        assert ours.dtype == torch.float32 and ours.shape == (4, 5)
        torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-5)


def test_chunking_does_not_change_results():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(7, 33, generator=gen)
    labels = torch.randint(0, 33, (7,), generator=gen)
    for fn in (
        lambda c: entropy_from_logits(logits, chunk_size=c),
        lambda c: logprobs_from_logits(logits, labels, chunk_size=c),
    ):
        full = fn(None)
        for chunk in (1, 2, 5, 7):
            torch.testing.assert_close(fn(chunk), full, rtol=1e-6, atol=1e-7)


def test_custom_backward_passes_gradcheck():
    gen = torch.Generator().manual_seed(2)
    logits = (torch.randn(3, 4, 6, generator=gen, dtype=torch.float64) * 2).requires_grad_(True)
    labels = torch.randint(0, 6, (3, 4), generator=gen)
    assert torch.autograd.gradcheck(lambda x: entropy_from_logits(x, chunk_size=5), (logits,))
    assert torch.autograd.gradcheck(lambda x: logprobs_from_logits(x, labels, chunk_size=2), (logits,))


def test_bf16_logits_use_fp32_math():
    gen = torch.Generator().manual_seed(3)
    logits = (torch.randn(6, 200, generator=gen) * 5).to(torch.bfloat16)
    labels = torch.randint(0, 200, (6,), generator=gen)
    ref_lp = _oracle_logprobs(logits.float(), labels)
    ref_h = _oracle_entropy(logits.float())
    lp = logprobs_from_logits(logits, labels)
    assert lp.dtype == torch.bfloat16  # verl's output dtype
    lp32 = logprobs_from_logits(logits, labels, out_dtype=torch.float32)
    h32 = entropy_from_logits(logits, out_dtype=torch.float32)
    assert lp32.dtype == torch.float32 and h32.dtype == torch.float32
    torch.testing.assert_close(lp32.double(), ref_lp, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(h32.double(), ref_h, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(lp.double(), ref_lp, rtol=1e-2, atol=2e-2)


def test_labels_shape_mismatch_is_an_error():
    with pytest.raises(ValueError):
        logprobs_from_logits(torch.randn(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))


def test_empty_batch():
    assert logprobs_from_logits(torch.randn(0, 4, 5), torch.zeros(0, 4, dtype=torch.long)).shape == (0, 4)
    assert entropy_from_logits(torch.randn(0, 5)).shape == (0,)


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 6),
    vocab=st.integers(1, 40),
    scale=st.floats(0.1, 30.0),
    chunk=st.integers(1, 8),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_entropy_bounds_and_logprob_normalisation(rows, vocab, scale, chunk, seed):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=gen, dtype=torch.float64) * scale
    h = entropy_from_logits(logits, chunk_size=chunk)
    assert torch.all(h >= -1e-9) and torch.all(h <= math.log(vocab) + 1e-9)
    total = torch.zeros(rows, dtype=torch.float64)
    for label in range(vocab):
        total += logprobs_from_logits(logits, torch.full((rows,), label), chunk_size=chunk).exp()
    torch.testing.assert_close(total, torch.ones(rows, dtype=torch.float64))
