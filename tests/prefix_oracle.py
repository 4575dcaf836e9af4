"""An independent count of what a prefix tree of token rows holds, for the shared-prefix tests."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch


def row_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[list[int]]:
    """Each row's real tokens."""
    return [ids[mask].tolist() for ids, mask in zip(input_ids, attention_mask.bool())]


def distinct_prefixes(rows: Iterable[Sequence[int]]) -> int:
    """The rows' distinct non-empty prefixes: the nodes of their prefix tree, the tokens a shared forward runs."""
    return len({tuple(row[: k + 1]) for row in rows for k in range(len(row))})
