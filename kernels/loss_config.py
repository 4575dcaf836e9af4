"""A policy loss's constants read from a verl-style actor config, with verl 0.9's field names and its fallbacks
for null fields: attribute access (verl's config dataclasses) or mapping access (DictConfig, dicts). One
definition for the engine's losses (``spear_engine.algorithms.losses``) and the verl integration
(``spear_kernels.integrations.verl``); it never imports verl."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .policy_loss import LOSS_MODES

GLOBAL_BATCH_INFO_KEYS = ("dp_size", "batch_num_tokens", "global_batch_size", "loss_scale_factor")
"""The keys verl 0.9 puts in ``config.global_batch_info`` (the keyword arguments of its ``agg_loss``)."""

# verl 0.9's fallbacks when a field is null (core_algos.compute_policy_loss_*)
CLIP_RATIO_C_DEFAULT = 3.0
CLIP_COV_RATIO_DEFAULT = 0.0002
CLIP_COV_LB_DEFAULT = 1.0
CLIP_COV_UB_DEFAULT = 5.0
KL_COV_RATIO_DEFAULT = 0.0002
PPO_KL_COEF_DEFAULT = 1.0

def field(obj: Any, name: str, default: Any = None) -> Any:
    """``obj.name`` for verl's config dataclasses, DictConfig and plain mappings (``default`` if absent)."""
    if isinstance(obj, Mapping):
        return obj.get(name, default)
    return getattr(obj, name, default)


def or_fallback(value: Any, fallback: Any) -> Any:
    return fallback if value is None else value


def clip_ranges(config: Any) -> dict[str, float]:
    clip_ratio = field(config, "clip_ratio")
    low = or_fallback(field(config, "clip_ratio_low"), clip_ratio)
    high = or_fallback(field(config, "clip_ratio_high"), clip_ratio)
    if low is None or high is None:
        raise ValueError("config needs clip_ratio (or both clip_ratio_low and clip_ratio_high)")
    return {"clip_ratio_low": float(low), "clip_ratio_high": float(high)}


def loss_constants(loss_mode: str, config: Any) -> dict[str, float]:
    """The hyper-parameters of ``loss_mode`` read from verl's actor ``config``, with verl 0.9's fallbacks,
    as keywords of :func:`spear_kernels.policy_loss`."""
    if config is None:
        raise ValueError("the policy loss needs the actor config; got config=None")
    if loss_mode == "gpg":
        return {}
    if loss_mode == "vanilla":
        getter = getattr(config, "get", None)  # verl: config.get("clip_ratio_c", 3.0)
        clip_c = getter("clip_ratio_c", CLIP_RATIO_C_DEFAULT) if callable(getter) else field(
            config, "clip_ratio_c", CLIP_RATIO_C_DEFAULT)  # fmt: skip
        if clip_c is None or not clip_c > 1.0:
            raise ValueError(f"clip_ratio_c (the dual-clip bound) must be > 1.0, got {clip_c}")
        return {**clip_ranges(config), "clip_ratio_c": float(clip_c)}
    section = field(config, "policy_loss")
    if section is None:
        raise ValueError(f"config.policy_loss is required by {loss_mode}")
    if loss_mode == "clip_cov":
        ratio = or_fallback(field(section, "clip_cov_ratio"), CLIP_COV_RATIO_DEFAULT)
        if not ratio > 0:
            raise ValueError(f"policy_loss.clip_cov_ratio must be > 0, got {ratio}")
        return {**clip_ranges(config), "clip_cov_ratio": float(ratio),
                "clip_cov_lb": float(or_fallback(field(section, "clip_cov_lb"), CLIP_COV_LB_DEFAULT)),
                "clip_cov_ub": float(or_fallback(field(section, "clip_cov_ub"), CLIP_COV_UB_DEFAULT))}  # fmt: skip
    if loss_mode == "kl_cov":
        ratio = or_fallback(field(section, "kl_cov_ratio"), KL_COV_RATIO_DEFAULT)
        if not ratio > 0:
            raise ValueError(f"policy_loss.kl_cov_ratio must be > 0, got {ratio}")
        return {"kl_cov_ratio": float(ratio),
                "ppo_kl_coef": float(or_fallback(field(section, "ppo_kl_coef"), PPO_KL_COEF_DEFAULT))}  # fmt: skip
    raise ValueError(f"unknown loss_mode {loss_mode!r}; expected one of {LOSS_MODES}")


def global_batch_info(config: Any) -> dict[str, Any]:
    """``config.global_batch_info`` (missing or null: ``{}``); a key ``agg_loss`` does not take is a TypeError,
    as in verl, where the dict is splatted into ``agg_loss``."""
    info = dict(field(config, "global_batch_info") or {})
    unknown = sorted(set(info) - set(GLOBAL_BATCH_INFO_KEYS))
    if unknown:
        raise TypeError(f"config.global_batch_info has keys agg_loss does not take: {unknown}")
    return info
