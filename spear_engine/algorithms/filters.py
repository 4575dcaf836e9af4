"""Dr.BoT filters: four response filters and the group-std rollout filter.

Response filters are *loss masks*: a flagged step-sample keeps its place in the batch, in the
group statistics and in the rollout filter; only its ``response_mask`` row becomes 0. The flags
come from the decoded response (``EpisodeRewardManager``): overlong, incomplete ("void turn"),
repetitive, unreadable. The rollout filter keeps the prompt groups whose per-trajectory mean
scores vary the most, and optionally reproduces the official random power-of-two subsample.
Semantics in full: docs/algorithm.md, 'Dr.BoT filters'.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np
import torch

# --------------------------------------------------------------------------------------------
# response flags
# --------------------------------------------------------------------------------------------
MAX_RESPONSE_LEN = 16384
"""Default overlong threshold of the official reward manager; the hybrid trainer passes
``data.max_response_length`` (512 in the agent scripts)."""
REPETITION_NGRAM = 20
"""n of the repeated n-gram test (official ``has_repeated_ngrams(n=20)``)."""
REPETITION_MIN_COUNT = 10
"""An n-gram occurring at least this often (overlapping windows counted) flags the response."""

UNREADABLE_MARKERS = (
    "\ufffd",
    "ï¿½",
    "ï¼\ufffd",
    "ï¼Ÿ",
    "ï¿½ï¿½",
    "ï¿½ï¿½ï¿½ï¿½",
    "Ġï¿½",
)
"""Mojibake markers of the official reward manager (its list repeats "\\ufffd" and "ï¼Ÿ"; duplicates
dropped). U+FFFD is the replacement character; the others are UTF-8 bytes decoded as cp1252."""

_ACTION_RE = re.compile(r"<action>(.*?)</action>", re.DOTALL)
_THINK_END = "</think>"

FLAG_KEYS = ("is_incomplete", "is_overlong", "is_repetitive", "is_unreadable")
"""Flag names as the official ``reward_extra_info`` keys, in the official application order."""
FILTER_METRICS = {
    "is_incomplete": "incomplete_responses",
    "is_overlong": "overlong_responses",
    "is_repetitive": "repetitive_responses",
    "is_unreadable": "unreadableBPE_responses",
}
"""Metric name (count of flagged rows) of each filter, as the official trainer logs it."""


def is_think_action_valid(solution_str: str | None) -> bool:
    """Whether a response holds an action: ``<action>...</action>`` after the last ``</think>``
    (or anywhere when there is no ``</think>``). None or blank text is invalid; ``<think>`` itself
    is not required."""
    if solution_str is None or not str(solution_str).strip():
        return False
    text = str(solution_str)
    cut = text.rfind(_THINK_END)
    tail = text if cut < 0 else text[cut + len(_THINK_END) :]
    return _ACTION_RE.search(tail) is not None


def is_incomplete(response_str: str | None) -> bool:
    """Void turn: no action in the response (``not is_think_action_valid``)."""
    return not is_think_action_valid(response_str)


def is_overlong(valid_response_length: int, max_response_len: int = MAX_RESPONSE_LEN) -> bool:
    """The response used the whole budget: ``valid tokens >= max_response_len``."""
    return int(valid_response_length) >= max_response_len


def has_repeated_ngrams(
    words: Sequence[Any] | np.ndarray | torch.Tensor,
    n: int = REPETITION_NGRAM,
    threshold: int = REPETITION_MIN_COUNT,
) -> bool:
    """Whether some contiguous ``n``-gram of ``words`` (token ids) occurs ``>= threshold`` times,
    overlapping occurrences counted. Fewer than ``n`` words never repeat."""
    if n < 1 or threshold < 1:
        raise ValueError(f"n and threshold must be >= 1, got n={n}, threshold={threshold}")
    items = words.tolist() if isinstance(words, (torch.Tensor, np.ndarray)) else list(words)
    windows = Counter(tuple(items[i : i + n]) for i in range(len(items) - n + 1))
    return any(count >= threshold for count in windows.values())


def is_unreadable(response_str: str | None, markers: Sequence[str] = UNREADABLE_MARKERS) -> bool:
    """The decoded response (special tokens kept) contains a mojibake marker."""
    return response_str is not None and any(marker in response_str for marker in markers)


def compute_response_flags(
    response_ids: Sequence[Sequence[int]],
    response_texts: Sequence[str | None],
    max_response_len: int = MAX_RESPONSE_LEN,
    ngram_n: int = REPETITION_NGRAM,
    ngram_threshold: int = REPETITION_MIN_COUNT,
) -> dict[str, np.ndarray]:
    """The four flags per step-sample, or per turn of a trajectory-layout row (bool arrays under
    :data:`FLAG_KEYS`).

    ``response_ids[i]``: the valid (unpadded) response token ids; ``response_texts[i]``: their
    decoding with special tokens kept (None allowed).
    """
    if len(response_ids) != len(response_texts):
        raise ValueError(f"{len(response_ids)} token lists but {len(response_texts)} texts")
    return {
        "is_incomplete": np.array([is_incomplete(t) for t in response_texts], dtype=bool),
        "is_overlong": np.array(
            [is_overlong(len(ids), max_response_len) for ids in response_ids], dtype=bool
        ),
        "is_repetitive": np.array(
            [has_repeated_ngrams(ids, ngram_n, ngram_threshold) for ids in response_ids], dtype=bool
        ),
        "is_unreadable": np.array([is_unreadable(t) for t in response_texts], dtype=bool),
    }


def apply_response_filters(
    response_mask: torch.Tensor,
    is_incomplete: Sequence[bool] | np.ndarray | torch.Tensor | None = None,
    is_overlong: Sequence[bool] | np.ndarray | torch.Tensor | None = None,
    is_repetitive: Sequence[bool] | np.ndarray | torch.Tensor | None = None,
    is_unreadable: Sequence[bool] | np.ndarray | torch.Tensor | None = None,
    spans: Sequence[tuple[int, int, int]] | None = None,
) -> tuple[torch.Tensor, dict[str, int]]:
    """Zero the ``response_mask`` tokens of flagged samples; a flag left None is a disabled filter.

    A sample is a row (``spans`` None: the official step layout) or, with ``spans``, the tokens
    ``[start, end)`` of row ``row`` for each ``(row, start, end)`` (a turn of a trajectory-layout row),
    and the flags have one entry per sample. Applied in the official order (incomplete, overlong,
    repetitive, unreadable). Metrics: for each enabled filter the number of samples it flags (overlaps
    count in each), under :data:`FILTER_METRICS` names. Returns a new mask of the same dtype.
    """
    flags = dict(zip(FLAG_KEYS, (is_incomplete, is_overlong, is_repetitive, is_unreadable)))
    mask = response_mask.clone()
    n_samples = mask.shape[0] if spans is None else len(spans)
    metrics: dict[str, int] = {}
    for key in FLAG_KEYS:
        flag = flags[key]
        if flag is None:
            continue
        if isinstance(flag, torch.Tensor):
            flag = flag.detach().cpu().numpy()
        flagged = np.asarray(flag, dtype=bool)
        if flagged.shape != (n_samples,):
            raise ValueError(f"{key} has {flagged.shape} entries for {n_samples} samples")
        if spans is None:
            mask[torch.as_tensor(flagged, device=mask.device)] = 0
        else:
            for sample in np.flatnonzero(flagged):
                row, start, end = spans[sample]
                mask[row, start:end] = 0
        metrics[FILTER_METRICS[key]] = int(flagged.sum())
    return mask, metrics


# --------------------------------------------------------------------------------------------
# group-std rollout filter
# --------------------------------------------------------------------------------------------
ROLLOUT_FILTER_TYPES = ("std", "std_rev")
"""``rollout.rollout_filter_type``: keep the groups of largest (std) or smallest (std_rev) spread."""


def group_score_stats(
    scores: torch.Tensor | np.ndarray | Sequence[float],
    index: Sequence[Hashable] | np.ndarray,
    traj_index: Sequence[Hashable] | np.ndarray,
) -> tuple[list[Hashable], np.ndarray, np.ndarray]:
    """Per prompt group (uid, first-seen order): mean and population std (ddof 0) of its
    trajectories' mean step-sample scores. ``scores`` is ``[B]`` or ``[B, T]`` (summed over T).

    These are the official rollout-filter statistics and also the SPEAR baseline's group means
    (:mod:`spear_engine.algorithms.self_imitation`): a long trajectory counts once, not once per step.
    """
    values = _scores_1d(scores)
    if len(values) != len(index) or len(values) != len(traj_index):
        raise ValueError(
            f"scores ({len(values)}), index ({len(index)}) and traj_index ({len(traj_index)}) differ"
        )
    per_group: dict[Hashable, dict[Hashable, list[float]]] = {}
    for value, uid, traj in zip(values.tolist(), _ids(index), _ids(traj_index)):
        per_group.setdefault(uid, {}).setdefault(traj, []).append(value)
    uids = list(per_group)
    traj_means = [[float(np.mean(v)) for v in per_group[uid].values()] for uid in uids]
    means = np.array([float(np.mean(m)) for m in traj_means], dtype=np.float64)
    stds = np.array([float(np.std(m)) for m in traj_means], dtype=np.float64)
    return uids, means, stds


def filter_rollout_by_group_std(
    scores: torch.Tensor | np.ndarray | Sequence[float],
    index: Sequence[Hashable] | np.ndarray,
    traj_index: Sequence[Hashable] | np.ndarray,
    rollout_filter_ratio: float = 1.0,
    rollout_filter_type: str = "std",
    pow2_subsample: bool = False,
    rng: np.random.Generator | int | None = None,
) -> tuple[np.ndarray, dict[str, float]]:
    """Keep the step-samples of the ``K = floor(ratio * #groups)`` groups with the largest
    (``std``) or smallest (``std_rev``) group std; ties keep first-seen group order.

    Args:
        scores: per-sample score ``[B]`` (or the ``[B, T]`` reward tensor): episode reward + bonus,
            before the invalid-action penalty in the official order of steps.
        index / traj_index: uid and traj_uid of each sample.
        rollout_filter_ratio: in (0, 1]; 1 logs the metrics and keeps everything (yaml 1.0, SPEAR 0.75).
        rollout_filter_type: ``std`` | ``std_rev``.
        pow2_subsample: official quirk - shuffle the kept samples and keep the first
            ``2**floor(log2 n)``; with ``n <= 1`` the official code keeps *none* (its helper
            returns -1 and slices ``[:-1]``), reproduced here. Not applied when the ratio is 1.
        rng: numpy Generator or seed for that shuffle (the official code uses Python's ``random``).

    Returns:
        kept row indices (int64, ascending: the batch order is preserved) and the metrics
        ``rollout/{in_group,chosen_in_group}_{std,max,mean}`` (std = mean group std, max / mean =
        max / mean of the group means).
    """
    if rollout_filter_type not in ROLLOUT_FILTER_TYPES:
        raise ValueError(
            f"Invalid rollout filter type: {rollout_filter_type!r}; expected {list(ROLLOUT_FILTER_TYPES)}"
        )
    if not 0 < rollout_filter_ratio <= 1:
        raise ValueError(f"rollout_filter_ratio must be in (0, 1], got {rollout_filter_ratio}")
    uids, means, stds = group_score_stats(scores, index, traj_index)
    if not uids:
        raise ValueError("filter_rollout_by_group_std needs a non-empty batch")
    metrics = {
        "rollout/in_group_std": float(np.mean(stds)),
        "rollout/in_group_max": float(np.max(means)),
        "rollout/in_group_mean": float(np.mean(means)),
    }
    row_uids = list(_ids(index))
    if rollout_filter_ratio == 1:
        metrics.update({f"rollout/chosen_{k[len('rollout/') :]}": v for k, v in list(metrics.items())})
        return np.arange(len(row_uids), dtype=np.int64), metrics

    keep_groups = int(float(rollout_filter_ratio) * float(len(uids)))
    if keep_groups <= 0:
        raise ValueError(f"rollout_filter_ratio={rollout_filter_ratio} keeps no group of {len(uids)}")
    ranked = sorted(range(len(uids)), key=lambda g: stds[g], reverse=rollout_filter_type == "std")
    chosen = ranked[:keep_groups]
    chosen_set = {uids[g] for g in chosen}
    chosen_in_order = [g for g in range(len(uids)) if uids[g] in chosen_set]
    metrics.update(
        {
            "rollout/chosen_in_group_std": float(np.mean([stds[g] for g in chosen])),
            "rollout/chosen_in_group_max": float(max(means[g] for g in chosen_in_order)),
            "rollout/chosen_in_group_mean": float(np.mean([means[g] for g in chosen_in_order])),
        }
    )
    kept = np.array([row for row, uid in enumerate(row_uids) if uid in chosen_set], dtype=np.int64)
    if pow2_subsample:
        kept = _pow2_subsample(kept, rng)
    return kept, metrics


def _pow2_subsample(rows: np.ndarray, rng: np.random.Generator | int | None) -> np.ndarray:
    """A random subset of ``rows`` of size ``2**floor(log2 n)`` (none when ``n <= 1``), sorted."""
    n = len(rows)
    if n <= 1:
        return rows[:0]
    size = 1 << (n.bit_length() - 1)
    generator = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    picked = rows[generator.permutation(n)[:size]]
    return np.sort(picked)


def _scores_1d(scores: torch.Tensor | np.ndarray | Sequence[float]) -> np.ndarray:
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().cpu()
        scores = scores.sum(dim=-1) if scores.dim() == 2 else scores
        return scores.double().numpy()
    values = np.asarray(scores, dtype=np.float64)
    return values.sum(axis=-1) if values.ndim == 2 else values


def _ids(ids: Sequence[Hashable] | np.ndarray | torch.Tensor) -> Sequence[Hashable]:
    return ids.tolist() if isinstance(ids, torch.Tensor) else ids
