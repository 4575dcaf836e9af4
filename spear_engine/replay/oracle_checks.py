"""Argument checks of the numpy replay oracle: the same rules, messages and exception types as the C++
bindings (csrc/bindings.cpp), shared by :mod:`spear_engine.replay.oracle` and
:mod:`spear_engine.replay.oracle_window`."""

from __future__ import annotations

import numpy as np


def describe(a: np.ndarray) -> str:
    return f"dtype {a.dtype} and shape {a.shape}"


def exact_1d(x, name: str, dtype) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype != np.dtype(dtype) or a.ndim != 1:
        raise ValueError(f"{name} must be a 1-D {np.dtype(dtype).name} array, got {describe(a)}")
    return a


def int64_1d(x, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 1 or not (a.dtype.kind in "iu" or a.size == 0):
        raise ValueError(f"{name} must be a 1-D integer array, got {describe(a)}")
    return a.astype(np.int64, copy=False)


def float64_1d(x, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 1 or not (a.dtype.kind in "fiu" or a.size == 0):
        raise ValueError(f"{name} must be a 1-D real array, got {describe(a)}")
    return a.astype(np.float64, copy=False)


def require_length(a: np.ndarray, n: int, name: str) -> None:
    if a.size != n:
        raise ValueError(f"{name} must have one entry per row ({n}), got {a.size}")
