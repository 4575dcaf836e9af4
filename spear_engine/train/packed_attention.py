"""Attention over packed sequences: rows concatenated into one sequence, attention kept within each row.

A packed forward hands the transformer one sequence ``[1, T]`` of every real token of a micro-batch, with
``position_ids`` restarting at 0 per row and the row boundaries as ``cu_seq_lens_q``/``cu_seq_lens_k``
(transformers' flash-attention keyword names, which every decoder layer passes through to its attention
function). :data:`PACKED_ATTENTION` is an attention implementation registered with transformers that

- with ``cu_seq_lens_q`` given, attends causally within each row: flash-attn's varlen kernel on CUDA
  when flash-attn is installed, else one attention call per row: on CPU in bf16/fp16 two batched GEMMs
  with fp32 scores (:func:`eager_causal_attention`, faster there than SDPA's CPU kernel), otherwise SDPA.
  No ``T x T`` mask exists and no FLOP is spent across rows;
- without it (generation, a padded forward), is exactly transformers' SDPA attention with its usual mask.

Packing is what removes padding from training (``actor.use_remove_padding``): the body of the model
runs on real tokens only. ``cu_seq_lens`` travel as forward keyword arguments (not global state), so a
gradient-checkpointed layer recomputed in the backward sees them again.

**Shared prefixes** (``actor.share_prefixes``): rows that begin with the same tokens (the episodes of a
group share their task prompt; in the step layout a policy that acts alike repeats whole prompts) are
packed as a prefix tree: a token common to several rows is run once, and each row's own tokens attend to
the shared ones through ``packed_key_index`` (every row's path in the tree, concatenated) with
``cu_seq_lens_k`` its bounds. The queries of a row are only its own new tokens, its keys its whole path,
causal aligned at the bottom right (a query at depth ``d`` sees the path up to ``d``). A token's hidden
state depends on its own prefix only, so the log-probs and gradients are those of the rows run one by
one (the shared tokens' gradient is the sum over the rows that share them), with fewer FLOPs.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

from spear_engine.train.prefix_tree import pack_prefix_tree

PACKED_ATTENTION = "spear_packed"

PACKED_MASK = torch.ones(1, 1, 1, 1, dtype=torch.bool)
"""The ``attention_mask`` of a packed forward: a 4-D mask is passed through transformers' mask creation
untouched (so no ``T x T`` mask is built), and the packed attention ignores it in favour of ``cu_seq_lens``."""


def _flash_varlen() -> Any:
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


def packed_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """query [1, Hq, T, d], key/value [1, Hkv, T, d] -> ([1, T, Hq, d], None), as transformers' interface."""
    cu_q = kwargs.get("cu_seq_lens_q")
    if cu_q is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)  # fmt: skip
    if query.shape[0] != 1:
        raise ValueError(f"a packed forward takes one sequence (batch size 1), got {query.shape[0]}")
    dropout = dropout if module.training else 0.0
    key_index = kwargs.get("packed_key_index")
    cu_k = kwargs.get("cu_seq_lens_k", cu_q)
    if key_index is not None:  # each row's keys: its whole path in the prefix tree
        key, value = key.index_select(2, key_index), value.index_select(2, key_index)
    varlen = _flash_varlen() if query.is_cuda else None
    if varlen is not None:  # causal with fewer queries than keys aligns at the bottom right (flash-attn >= 2.1)
        out = varlen(
            query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1),
            cu_q.to(torch.int32), cu_k.to(torch.int32),
            int(kwargs.get("max_length_q") or query.shape[2]), int(kwargs.get("max_length_k") or key.shape[2]),
            dropout_p=dropout, softmax_scale=scaling, causal=True,
        )  # fmt: skip
        return out[None], None
    eager = query.device.type == "cpu" and value.dtype in REDUCED_PRECISION and dropout == 0.0
    # split, not slices: the backward of a split is one cat, that of each slice a zero-filled full-size gradient
    q_lengths, k_lengths = torch.diff(cu_q).tolist(), torch.diff(cu_k).tolist()
    queries = query.split(q_lengths, dim=2)
    keys, values = key.split(k_lengths, dim=2), value.split(k_lengths, dim=2)
    parts = [eager_causal_attention(q, k, v, scaling) if eager else _causal_attention(q, k, v, dropout, scaling)
             for q, k, v in zip(queries, keys, values, strict=True) if q.shape[2] > 0]  # fmt: skip
    out = torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]
    return out.transpose(1, 2).contiguous(), None


def _causal_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout: float, scaling: float | None
) -> torch.Tensor:
    """SDPA of the last ``Lq`` positions of a causal sequence of ``Lk`` keys (bottom-right aligned); query
    [1, Hq, Lq, d], key/value [1, Hkv, Lk, d] (grouped-query heads: the key/value heads are repeated)."""
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    lq, lk = query.shape[2], key.shape[2]
    if lq == lk:
        return F.scaled_dot_product_attention(query, key, value, dropout_p=dropout, scale=scaling, is_causal=True)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=_visible(lq, lk, query.device),
                                          dropout_p=dropout, scale=scaling)  # fmt: skip


def _visible(lq: int, lk: int, device: torch.device) -> torch.Tensor:
    """[Lq, Lk] bool, True where query i (the last Lq of Lk positions) may see key j: j <= Lk - Lq + i."""
    return torch.ones(lq, lk, dtype=torch.bool, device=device).tril(lk - lq)


REDUCED_PRECISION = (torch.bfloat16, torch.float16)


def eager_causal_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float | None
) -> torch.Tensor:
    """Bottom-right causal attention of one row in bf16/fp16 on CPU: scores and softmax in fp32, then a
    product of the probabilities with ``value`` in its dtype. query [1, Hq, Lq, d], key/value [1, Hkv, Lk, d]
    (grouped-query heads are folded into the query length: one GEMM per key/value head, no repeated keys).

    Why not SDPA: on CPU, its flash kernel in bf16 runs these shapes (tens to hundreds of queries against a
    few hundred keys, one call per row) at a fraction of the GEMM rate, and its backward is the slowest part
    of the update. Here the two products are plain batched GEMMs and autograd's backward is GEMMs too:
    1.5-1.7x faster per layer than SDPA on quickstart-like shared-prefix rows (AMD EPYC Zen 5,
    bench/bench_packed_attention.py), with SDPA's accuracy (tests/train/test_packed_attention.py holds it
    within 1.5x of SDPA's own error against an fp64 oracle). Under autocast the query and key
    arrive in fp32 (after the rotary embedding), and the scores keep them, where SDPA would round them."""
    _, heads, lq, dim = query.shape
    kv_heads, lk = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    scale = dim**-0.5 if scaling is None else scaling
    bias = _causal_bias(lq, lk, groups, query.device)
    with torch.autocast(query.device.type, enabled=False):  # autocast would run the scores' GEMM in bf16
        q = query[0].reshape(kv_heads, groups * lq, dim).float()  # query heads of a key head side by side
        scores = torch.baddbmm(bias.expand(kv_heads, -1, -1), q, key[0].float().transpose(1, 2), alpha=scale)
        probs = torch.softmax(scores, dim=-1).to(value.dtype)
        out = torch.bmm(probs, value[0])
    return out.reshape(1, heads, lq, dim)


_BIAS_CACHE: OrderedDict[tuple[int, int, int, torch.device], torch.Tensor] = OrderedDict()
_BIAS_CACHE_BYTES = 256 * 2**20


def _causal_bias(lq: int, lk: int, groups: int, device: torch.device) -> torch.Tensor:
    """[groups * Lq, Lk] fp32: 0 where a query (of ``groups`` query heads side by side) may see a key, -inf
    elsewhere. Kept in a small cache (least recently used out past 256 MiB): every layer of a forward (and of
    its recompute under gradient checkpointing) attends each row with the same shape, and building the bias
    each time was ~2 % of a quickstart update (AMD EPYC Zen 4)."""
    key = (lq, lk, groups, device)
    bias = _BIAS_CACHE.get(key)
    if bias is not None:
        _BIAS_CACHE.move_to_end(key)
        return bias
    hidden = ~_visible(lq, lk, device)
    bias = torch.zeros(lq, lk, dtype=torch.float32, device=device).masked_fill_(hidden, float("-inf"))
    bias = bias.repeat(groups, 1)
    size = bias.numel() * bias.element_size()
    if size <= _BIAS_CACHE_BYTES:
        _BIAS_CACHE[key] = bias
        while sum(b.numel() * b.element_size() for b in _BIAS_CACHE.values()) > _BIAS_CACHE_BYTES:
            _BIAS_CACHE.popitem(last=False)
    return bias


AttentionInterface.register(PACKED_ATTENTION, packed_attention_forward)
AttentionMaskInterface.register(PACKED_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def use_packed_attention(model: torch.nn.Module) -> None:
    """Switch a transformers model to :data:`PACKED_ATTENTION` (identical to SDPA on unpacked inputs)."""
    current = getattr(model.config, "_attn_implementation", None)
    if current == PACKED_ATTENTION:
        return
    if current not in (None, "sdpa", "eager"):
        raise ValueError(f"actor.use_remove_padding needs a model whose attention is sdpa or eager; this one uses "
                         f"{current!r}. Set actor.use_remove_padding=false.")  # fmt: skip
    model.set_attn_implementation(PACKED_ATTENTION)
    if model.config._attn_implementation != PACKED_ATTENTION:
        raise ValueError(f"{type(model).__name__} does not take a custom attention function (transformers' "
                         f"AttentionInterface); set actor.use_remove_padding=false.")  # fmt: skip


def pack_rows(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, share_prefixes: bool = False
) -> dict[str, Any]:
    """The real tokens of [N, W] rows as one packed sequence (``share_prefixes``: as a prefix tree, see
    :func:`pack_prefix_tree`, when two rows share at least their first token).

    Each row's real tokens should be contiguous (every row the trainer builds is: left-padded prompt,
    right-padded response). A hole inside a row is dropped here, while the padded forward would still let
    the hole's own hidden state predict the token after it, so the two forwards differ on such rows.

    Returns ``input_ids``/``position_ids`` [1, T], ``cu_seqlens`` [N + 1] and ``index`` [N, W]: the packed
    position of each real token, -1 for padding; ``key_index`` (None: each row's keys are its queries),
    ``cu_seqlens_k`` and ``max_length_k`` as :func:`pack_prefix_tree` returns them."""
    mask = attention_mask.bool()
    if share_prefixes:
        tree = pack_prefix_tree(input_ids, mask)
        if tree is not None:
            return tree
    lengths = mask.sum(1)
    total = int(lengths.sum())
    device = input_ids.device
    starts = torch.cumsum(lengths, 0) - lengths
    positions = torch.arange(total, device=device) - torch.repeat_interleave(starts, lengths)
    index = torch.full(mask.shape, -1, dtype=torch.long, device=device)
    index[mask] = torch.arange(total, device=device)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.long, device=device)
    cu[1:] = torch.cumsum(lengths, 0)
    longest = int(lengths.max()) if len(lengths) else 0
    return {"input_ids": input_ids[mask][None], "position_ids": positions[None], "cu_seqlens": cu,
            "max_length": longest, "key_index": None, "cu_seqlens_k": cu, "max_length_k": longest,
            "index": index}  # fmt: skip
