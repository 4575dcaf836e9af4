"""Prefix trees of token rows: rows that begin alike run their common prefix once.

:func:`pack_prefix_tree` lays the rows of one forward out as a tree for the packed attention
(:mod:`spear_engine.train.packed_attention`); :func:`shared_prefix_chunks` orders the rows of a mini-batch
so that rows with a common prefix share a forward, within a token budget that counts a shared token once.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import torch


def real_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[list[int]]:
    """Each row's real tokens, as lists."""
    mask = attention_mask.bool().cpu()
    return [ids[m].tolist() for ids, m in zip(input_ids.cpu(), mask, strict=True)]


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def pack_prefix_tree(input_ids: torch.Tensor, mask: torch.Tensor) -> dict[str, Any] | None:
    """The real tokens of [N, W] rows as a prefix tree, each distinct prefix once; None if no row shares one.

    Rows are visited in lexicographic order of their tokens, where the longest prefix a row shares with any
    row before it is the one it shares with the row just before it; the row adds its remaining tokens as
    new nodes. ``input_ids``/``position_ids`` [1, T] are the nodes (position = depth), ``cu_seqlens`` the
    bounds of each row's new nodes (its queries), ``key_index`` every such row's whole path (its keys) with
    ``cu_seqlens_k`` their bounds, and ``index`` [N, W] the node of each real token, -1 for padding."""
    rows = real_rows(input_ids, mask)
    tokens: list[int] = []
    positions: list[int] = []
    paths: list[list[int]] = [[] for _ in rows]
    keys: list[int] = []
    cu_q, cu_k = [0], [0]
    previous: list[int] = []
    previous_path: list[int] = []
    shared_any = False
    for r in sorted(range(len(rows)), key=rows.__getitem__):
        row = rows[r]
        shared = common_prefix(previous, row)
        shared_any |= shared > 0
        start = len(tokens)
        paths[r] = previous_path[:shared] + list(range(start, start + len(row) - shared))
        if len(row) > shared:
            tokens.extend(row[shared:])
            positions.extend(range(shared, len(row)))
            keys.extend(paths[r])
            cu_q.append(len(tokens))
            cu_k.append(len(keys))
        previous, previous_path = row, paths[r]
    if not shared_any:
        return None
    device = input_ids.device
    index = torch.full(mask.shape, -1, dtype=torch.long, device=device)
    index[mask] = _longs([node for path in paths for node in path], device)
    q_lengths = [b - a for a, b in itertools.pairwise(cu_q)]
    k_lengths = [b - a for a, b in itertools.pairwise(cu_k)]
    return {"input_ids": _longs(tokens, device)[None], "position_ids": _longs(positions, device)[None],
            "cu_seqlens": _longs(cu_q, device), "max_length": max(q_lengths), "key_index": _longs(keys, device),
            "cu_seqlens_k": _longs(cu_k, device), "max_length_k": max(k_lengths), "index": index}  # fmt: skip


def _longs(values: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long, device=device)


def shared_prefix_chunks(rows: list[list[int]], budget: int) -> list[np.ndarray]:
    """Positions of ``rows`` in lexicographic order of their tokens (rows with a common prefix side by side),
    grouped greedily so each group's *distinct* tokens stay within ``budget`` (a longer row alone): a row
    costs the tokens past the prefix it shares with the row before it in its group, what a prefix-tree
    forward (:func:`pack_prefix_tree`) runs for it."""
    chunks: list[np.ndarray] = []
    current: list[int] = []
    used = 0
    for i in sorted(range(len(rows)), key=rows.__getitem__):
        cost = len(rows[i]) - (common_prefix(rows[current[-1]], rows[i]) if current else 0)
        if current and used + cost > budget:
            chunks.append(np.array(current))
            current, used, cost = [], 0, len(rows[i])
        current.append(i)
        used += cost
    if current:
        chunks.append(np.array(current))
    return chunks


def distinct_tokens(rows: list[list[int]]) -> int:
    """Tokens a prefix-tree forward of ``rows`` runs: each distinct prefix once."""
    ordered = sorted(rows)
    return sum(len(b) - common_prefix(a, b) for a, b in itertools.pairwise([[], *ordered]))
