"""Replay storage for SPEAR self-imitation (contract: docs/replay_index_spec.md).

``ReplayIndex`` and ``BaselineWindow`` are the C++ implementations (pybind11 module
``spear_engine._replay_index``); ``NumpyReplayIndex`` and ``NumpyBaselineWindow`` are the plain-numpy
oracle with the same API, the same draws and the same byte format (:mod:`spear_engine.replay.format`),
in :mod:`spear_engine.replay.oracle` and :mod:`spear_engine.replay.oracle_window`. The oracle is a test
and benchmark baseline: each module is imported on first use of its name, not with this package.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from spear_engine._replay_index import BaselineWindow, ReplayIndex

if TYPE_CHECKING:
    from spear_engine.replay.oracle import NumpyReplayIndex
    from spear_engine.replay.oracle_window import NumpyBaselineWindow

__all__ = ["BaselineWindow", "NumpyBaselineWindow", "NumpyReplayIndex", "ReplayIndex"]

_ORACLE_MODULES = {"NumpyBaselineWindow": "oracle_window", "NumpyReplayIndex": "oracle"}


def __getattr__(name: str) -> Any:
    if name in _ORACLE_MODULES:
        module = importlib.import_module(f"{__name__}.{_ORACLE_MODULES[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
