"""Curriculum schedules on the global training step t (t = 1 for the first training step).

* Replay coefficient: cosine warm-up of the self-imitation loss weight,
  ``c(t) = C (1 - cos(pi t / T)) / 2`` for ``t <= T``, then ``C``; ``c(1) ~ 0``, ``c(T) = C``.
* Tool-call bonus factor: cosine decay ``(1 + cos(pi t / T)) / 2`` for ``t <= T``, then 0.

The arithmetic follows the official expressions term by term, so float results are identical
(docs/algorithm.md, 'Schedules').
"""

from __future__ import annotations

import math

TOOLCALL_MODES = ("none", "constant", "cosine")
"""``algorithm.use_toolcall_reward`` (yaml default ``none``; SPEAR scripts ``cosine``). The official
agent code treats any string other than none/constant as cosine; here an unknown mode is an error."""


def _check_horizon(max_steps: float) -> None:
    if not max_steps > 0:
        raise ValueError(f"max_steps must be > 0, got {max_steps}")


def replay_coefficient(step: int, coef: float, max_steps: int) -> float:
    """Weight c(t) of the replay (self-imitation) loss at global step ``step``.

    Args:
        step: global training step t (1-based, as the official trainer).
        coef: C = ``replay_loss_coef`` (README 1; agent yaml 0.001; every SPEAR script 1).
        max_steps: T = ``max_replay_loss_steps`` (yaml 200; what the agent scripts ran; math 300).
    """
    _check_horizon(max_steps)
    if step <= max_steps:
        return coef * (-math.cos((step / max_steps) * math.pi) + 1) / 2
    return coef


def toolcall_bonus_factor(step: int, mode: str, max_steps: int) -> float:
    """Multiplier of the raw tool-call bonus at global step ``step`` (agent and math code alike).

    Args:
        step: global step t (>= 0; validation before training uses 0, giving factor 1 for cosine).
        mode: ``none`` -> 0, ``constant`` -> 1, ``cosine`` -> ``max(0, (1 + cos(pi t/T)) / 2)`` for
            ``t <= T`` and 0 afterwards. Anything else raises ValueError.
        max_steps: T = ``algorithm.max_toolcall_steps`` (yaml 100; every SPEAR script 200).
    """
    if mode == "none":
        return 0.0
    if mode == "constant":
        return 1.0
    if mode != "cosine":
        raise ValueError(f"Unknown tool-call reward mode: {mode!r}; expected one of {list(TOOLCALL_MODES)}")
    _check_horizon(max_steps)
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step > max_steps:
        return 0.0
    return max(0.0, (math.cos((step / max_steps) * math.pi) + 1) / 2)
