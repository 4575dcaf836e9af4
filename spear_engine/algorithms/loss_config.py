"""How the policy losses read a verl-style config: the clip constants, the ``policy_loss`` section, the
aggregation kwargs (``global_batch_info``), and read-only views of a config with some values replaced -
the per-micro-batch ``global_batch_info`` a trainer passes (:func:`config_view`; verl mutates its config
instead) and the official SPEAR ``is_replay=True`` constants (:func:`replay_loss_config`).

``config`` is any object with the attributes verl reads - a dataclass, ``SimpleNamespace``, pydantic
model or OmegaConf ``DictConfig``. The constants' defaults and fallbacks themselves live in
``spear_kernels.loss_config``, which the kernels read too (these are the replay ones of the official code).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from spear_kernels.loss_config import clip_ranges, field, loss_constants, or_fallback

# Official fallbacks when a *_replay constant is null (A:core_algos clip_cov / kl_cov, is_replay=True).
REPLAY_CLIP_COV_RATIO_FALLBACK = 0.002
REPLAY_CLIP_COV_LB_FALLBACK = 1.0
REPLAY_CLIP_COV_UB_FALLBACK = 40.0
REPLAY_KL_COV_RATIO_FALLBACK = 0.8


def clip_range_pair(config: Any) -> tuple[float, float]:
    """(eps_low, eps_high): ``clip_ratio_low/high``, each falling back to ``clip_ratio`` when null."""
    ranges = clip_ranges(config)
    return ranges["clip_ratio_low"], ranges["clip_ratio_high"]


def dual_clip_c(config: Any) -> float:
    """Dual-clip constant: ``config.get("clip_ratio_c", 3.0)`` when the config has ``.get`` (verl)."""
    return loss_constants("vanilla", config)["clip_ratio_c"]


def policy_loss_section(config: Any) -> Any:
    if config is None:
        raise ValueError("this policy loss needs a config")
    section = field(config, "policy_loss")
    if section is None:
        raise ValueError("config.policy_loss is required by clip_cov / kl_cov")
    return section


def kernel_loss_constants(loss_mode: str, config: Any) -> dict[str, float]:
    """The constants of ``loss_mode`` as ``spear_kernels.policy_loss`` keywords, read from ``config`` with verl's
    fallbacks (``spear_kernels.loss_config``; for replay rows pass ``replay_loss_config(config)``)."""
    return loss_constants(loss_mode, config)


def batch_info(config: Any) -> dict[str, Any]:
    """``config.global_batch_info`` as agg_loss kwargs; missing or null means {}."""
    if config is None:
        return {}
    return dict(field(config, "global_batch_info") or {})


class ConfigView:
    """Read-only view of ``base`` with some attributes replaced (``.get`` and attribute access)."""

    def __init__(self, base: Any, overrides: Mapping[str, Any]):
        object.__setattr__(self, "_base", base)
        object.__setattr__(self, "_overrides", dict(overrides))

    def __getattr__(self, name: str) -> Any:
        overrides = object.__getattribute__(self, "_overrides")
        if name in overrides:
            return overrides[name]
        base = object.__getattribute__(self, "_base")
        if isinstance(base, Mapping):
            if name in base:
                return base[name]
            raise AttributeError(name)
        return getattr(base, name)

    def get(self, name: str, default: Any = None) -> Any:
        if name in self._overrides:
            return self._overrides[name]
        getter = getattr(self._base, "get", None)
        if callable(getter):
            return getter(name, default)
        return getattr(self._base, name, default)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("a replay config view is read-only")

    def __repr__(self) -> str:
        return f"ConfigView({self._base!r}, overrides={self._overrides!r})"


def config_view(config: Any, **overrides: Any) -> ConfigView:
    """A read-only view of ``config`` with some attributes replaced, e.g. the per-micro-batch
    ``global_batch_info`` a trainer passes to the loss functions (verl mutates its config instead)."""
    return ConfigView(config, overrides)


def replay_loss_config(config: Any) -> Any:
    """The config the official code's ``is_replay=True`` branch reads, as a view of ``config``.

    ``policy_loss.clip_cov_ratio/lb/ub`` and ``policy_loss.kl_cov_ratio`` become the ``*_replay``
    values, each falling back (when null or absent) to the official replay defaults 0.002 / 1.0 /
    40.0 and 0.8. Everything else, ``ppo_kl_coef`` included, reads through to
    ``config``. Pass the view as ``config`` to any policy loss; verl's signatures stay unchanged.
    """
    section = policy_loss_section(config)
    replay = {
        "clip_cov_ratio": or_fallback(field(section, "clip_cov_ratio_replay"), REPLAY_CLIP_COV_RATIO_FALLBACK),
        "clip_cov_lb": or_fallback(field(section, "clip_cov_lb_replay"), REPLAY_CLIP_COV_LB_FALLBACK),
        "clip_cov_ub": or_fallback(field(section, "clip_cov_ub_replay"), REPLAY_CLIP_COV_UB_FALLBACK),
        "kl_cov_ratio": or_fallback(field(section, "kl_cov_ratio_replay"), REPLAY_KL_COV_RATIO_FALLBACK),
    }
    return ConfigView(config, {"policy_loss": ConfigView(section, replay)})
