"""The CPU attention of one packed row in bf16/fp16 (``eager_causal_attention``) against an fp64 oracle.

The oracle is written here from the definition (scores over the keys each query may see, bottom-right
causal, softmax, weighted values; grouped-query heads share a key/value head), on fresh random inputs of
odd sizes. The tolerance is set by SDPA itself: the eager path must be as accurate as the SDPA call it
replaces on the same inputs (within a factor 1.5 of SDPA's own error against the oracle), plus a loose
absolute bound so that a wrong mask (which changes outputs by O(1)) fails whatever SDPA does.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from spear_engine.train import packed_attention
from spear_engine.train.packed_attention import eager_causal_attention


def oracle(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """fp64, head by head and query by query: query i (of Lq, the last Lq of Lk positions) sees keys 0..Lk-Lq+i."""
    _, heads, lq, dim = query.shape
    kv_heads, lk = key.shape[1], key.shape[2]
    out = torch.zeros(1, heads, lq, dim, dtype=torch.float64)
    for h in range(heads):
        kv = h // (heads // kv_heads)
        for i in range(lq):
            seen = lk - lq + i + 1
            scores = key[0, kv, :seen].double() @ query[0, h, i].double() / math.sqrt(dim)
            out[0, h, i] = torch.softmax(scores, 0) @ value[0, kv, :seen].double()
    return out


def sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    lq, lk = query.shape[2], key.shape[2]
    groups = query.shape[1] // key.shape[1]
    k, v = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    dtype = value.dtype
    allowed = torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq)
    return F.scaled_dot_product_attention(query.to(dtype), k.to(dtype), v, attn_mask=allowed)


def inputs(seed: int, lq: int, lk: int, heads: int, kv_heads: int, qk_dtype: torch.dtype, v_dtype: torch.dtype):
    g = torch.Generator().manual_seed(seed)
    dim = 24

    def draw(h: int, n: int, scale: float, dtype: torch.dtype) -> torch.Tensor:
        return (torch.randn(1, h, n, dim, generator=g) * scale).to(dtype).requires_grad_()

    return draw(heads, lq, 1.5, qk_dtype), draw(kv_heads, lk, 1.5, qk_dtype), draw(kv_heads, lk, 1.0, v_dtype)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error; a zero oracle (one query seeing one key has no query gradient) counts it absolutely."""
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-6))


@pytest.mark.parametrize(("lq", "lk"), [(1, 1), (7, 7), (5, 37), (29, 61)])
@pytest.mark.parametrize(("heads", "kv_heads"), [(3, 3), (6, 2)])
@pytest.mark.parametrize(
    "dtypes", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16), (torch.float32, torch.bfloat16)],
    ids=["bf16", "fp16", "autocast"],  # under autocast the rotary embedding hands over fp32 queries and keys
)
def test_eager_attention_matches_the_oracle_as_well_as_sdpa(lq: int, lk: int, heads: int, kv_heads: int,
                                                             dtypes: tuple[torch.dtype, torch.dtype]) -> None:  # fmt: skip
    seed = 1000 * lq + lk + 7 * heads
    weights = torch.randn(1, heads, lq, 24, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    results = {}
    for name, attend in [("eager", lambda q, k, v: eager_causal_attention(q, k, v, None)), ("sdpa", sdpa),
                         ("oracle", oracle)]:  # fmt: skip
        q, k, v = inputs(seed, lq, lk, heads, kv_heads, *dtypes)
        out = attend(q, k, v)
        (out.double() * weights).sum().backward()
        results[name] = (out.detach(), q.grad, k.grad, v.grad)
    assert results["eager"][0].dtype == dtypes[1]  # the output in the values' dtype, as SDPA returns it
    for part in range(4):  # output, d query, d key, d value
        eager = relative(results["eager"][part], results["oracle"][part])
        reference = relative(results["sdpa"][part], results["oracle"][part])
        assert eager <= 1.5 * reference + 1e-3, (part, eager, reference)
        assert eager < 0.02, (part, eager)


def test_eager_attention_keeps_the_prefix_causal() -> None:
    """A key after a query's position changes nothing for that query; one before it does."""
    q, k, v = inputs(5, 4, 9, 4, 2, torch.bfloat16, torch.bfloat16)
    q, k, v = q.detach(), k.detach(), v.detach()
    base = eager_causal_attention(q, k, v, None)
    later, earlier = v.clone(), v.clone()
    later[0, :, 6] += 10.0  # position 6: seen by queries 1.. (query i sees keys 0..5+i), not by query 0
    earlier[0, :, 2] += 10.0  # seen by every query
    moved_later = eager_causal_attention(q, k, later, None)
    moved_earlier = eager_causal_attention(q, k, earlier, None)
    assert torch.equal(moved_later[0, :, 0], base[0, :, 0])
    assert not torch.equal(moved_later[0, :, 1], base[0, :, 1])
    assert (moved_earlier != base).any(dim=-1).all()


def test_the_cached_causal_bias_is_right_and_its_cache_stays_under_its_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bias every layer reuses: 0 where query i (the last Lq of Lk positions, ``groups`` query heads side by
    side) sees key j <= Lk - Lq + i, -inf elsewhere; the cache drops the least recently used past its byte bound
    and never keeps a bias larger than the bound, and an evicted shape is rebuilt right."""
    monkeypatch.setattr(packed_attention, "_BIAS_CACHE", packed_attention.OrderedDict())
    monkeypatch.setattr(packed_attention, "_BIAS_CACHE_BYTES", 3 * 20 * 30 * 4 * 2)  # two [60, 30] fp32 biases
    cpu = torch.device("cpu")

    def expected(lq: int, lk: int, groups: int) -> torch.Tensor:
        seen = torch.arange(lk)[None, :] <= (lk - lq + torch.arange(lq))[:, None]
        one = torch.where(seen, 0.0, float("-inf"))
        return torch.cat([one] * groups)

    shapes = [(20, 30, 3), (7, 30, 3), (20, 20, 3), (20, 30, 3), (1, 5, 9)]
    for lq, lk, groups in shapes:
        assert torch.equal(packed_attention._causal_bias(lq, lk, groups, cpu), expected(lq, lk, groups))
        held = sum(b.numel() * b.element_size() for b in packed_attention._BIAS_CACHE.values())
        assert held <= packed_attention._BIAS_CACHE_BYTES
    assert packed_attention._causal_bias(20, 30, 3, cpu) is packed_attention._causal_bias(20, 30, 3, cpu)
    big = packed_attention._causal_bias(100, 100, 3, cpu)  # over the bound: built, not kept
    assert torch.equal(big, expected(100, 100, 3)) and (100, 100, 3, cpu) not in packed_attention._BIAS_CACHE
