"""Rollout / trainer mismatch: how far the rollout engine's log-probs are from the trainer's, and verl's
truncated importance-sampling weights that correct for it (``rollout.rollout_is``)."""

from __future__ import annotations

import math

import torch

ROLLOUT_IS_MODES = ("none", "token", "sequence", "geometric")


def rollout_correction(
    rollout_log_prob: torch.Tensor, old_log_prob: torch.Tensor, response_mask: torch.Tensor, mode: str,
    threshold: float,
) -> tuple[torch.Tensor | None, dict[str, float]]:  # fmt: skip
    """(IS weights or None for ``mode="none"``, mismatch metrics). The weights are pi_train_old / pi_rollout per
    token (``token``), the product of a row's token ratios (``sequence``) or their geometric mean
    (``geometric``), capped at ``threshold`` and zero outside ``response_mask``; the metrics are logged
    whatever the mode."""
    if mode not in ROLLOUT_IS_MODES:
        raise ValueError(f"unknown rollout IS mode {mode!r}; expected one of {ROLLOUT_IS_MODES}")
    diff = (old_log_prob - rollout_log_prob) * response_mask
    count = response_mask.sum().clamp_min(1)
    log_ratio_max = (
        float(torch.where(response_mask > 0, diff, torch.full_like(diff, -math.inf)).max())
        if response_mask.any() else 0.0
    )  # fmt: skip
    metrics = {
        "mismatch/kl": float(((rollout_log_prob - old_log_prob) * response_mask).sum() / count),
        "mismatch/abs_log_ratio_mean": float(diff.abs().sum() / count),
        "mismatch/max_ratio": math.exp(min(log_ratio_max, 50.0)),
    }
    if mode == "none":
        return None, metrics
    if mode == "token":
        log_w = diff
    elif mode == "sequence":  # verl: the product of the row's token ratios
        log_w = diff.sum(-1, keepdim=True).expand_as(diff)
    else:  # "geometric": their geometric mean
        log_w = (diff.sum(-1) / response_mask.sum(-1).clamp_min(1))[:, None].expand_as(diff)
    weights = torch.exp(log_w.clamp(max=math.log(threshold))) * response_mask
    metrics["mismatch/is_weight_mean"] = float(weights.sum() / count)
    return weights.detach(), metrics
