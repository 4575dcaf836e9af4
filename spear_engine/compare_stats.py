"""Statistics over seeds for ``spear compare``: the mean and its 95% Student's t-interval (n - 1 df),
and the normalised area under a curve. Pure math on plain numbers: no files, no figure."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

# The 0.975 quantile of Student's t for df = 1..30 (two-sided 95%); beyond, a Cornish-Fisher expansion.
_T975 = (
    12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
    2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
    2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423,
)  # fmt: skip
_Z975 = 1.959964


def json_float(value: float | None) -> float | None:
    """``value`` when it is a finite number, else None (JSON has no nan)."""
    return value if value is not None and math.isfinite(value) else None


@dataclass(frozen=True)
class Estimate:
    """A mean over seeds and the half-width of its 95% t-interval (nan when n < 2)."""

    mean: float
    half_width: float
    n: int

    def scaled(self, factor: float) -> Estimate:
        return Estimate(self.mean * factor, self.half_width * factor, self.n)

    def to_json(self) -> dict[str, Any]:
        return {"mean": json_float(self.mean), "half_width": json_float(self.half_width), "n": self.n}


def t_quantile(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (a table to df 30, then a
    Cornish-Fisher expansion, off by < 1e-3)."""
    if df < 1:
        raise ValueError(f"t_quantile needs df >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """Mean and half-width of the 95% t-interval of the mean: ``t(n-1) * sd / sqrt(n)`` with the sample
    sd. One value has no spread to estimate: half-width nan. No values: both nan."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = math.fsum(values) / n
    if n == 1:
        return mean, math.nan
    return mean, t_quantile(n - 1) * statistics.stdev(values) / math.sqrt(n)


def estimate(values: Sequence[float]) -> Estimate:
    mean, half = mean_ci(values)
    return Estimate(mean, half, len(values))


def intervals_overlap(a: Estimate, b: Estimate) -> bool | None:
    """Whether the two 95% intervals overlap; None when either has no interval (n = 1)."""
    if not (math.isfinite(a.half_width) and math.isfinite(b.half_width)):
        return None
    return abs(a.mean - b.mean) <= a.half_width + b.half_width


def normalised_auc(steps: Sequence[int], values: Sequence[float], upto: int) -> float:
    """The trapezoid mean of a curve over its points at steps <= ``upto``: the area divided by the span
    of steps, so a constant curve gives its constant. A single point gives its value; none, nan."""
    points = [(s, v) for s, v in zip(steps, values) if s <= upto]
    if not points:
        return math.nan
    if len(points) == 1:
        return points[0][1]
    area = math.fsum((s1 - s0) * (v0 + v1) / 2 for (s0, v0), (s1, v1) in pairwise(points))
    return area / (points[-1][0] - points[0][0])
