"""Replay storage for SPEAR self-imitation (contract: docs/replay_index_spec.md).

``ReplayIndex`` and ``BaselineWindow`` are the C++ implementations (pybind11 module
``spear_engine._replay_index``); ``NumpyReplayIndex`` and ``NumpyBaselineWindow`` are the plain-numpy
oracle with the same API, the same draws and the same byte format (:mod:`spear_engine.replay.format`).
The oracle is a test and benchmark baseline: it is imported on first use of its names, not with this
package.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from spear_engine._replay_index import BaselineWindow, ReplayIndex

if TYPE_CHECKING:
    from spear_engine.replay.oracle import NumpyBaselineWindow, NumpyReplayIndex

__all__ = ["BaselineWindow", "NumpyBaselineWindow", "NumpyReplayIndex", "ReplayIndex"]

_ORACLE_NAMES = ("NumpyBaselineWindow", "NumpyReplayIndex")


def __getattr__(name: str) -> Any:
    if name in _ORACLE_NAMES:
        from spear_engine.replay import oracle

        return getattr(oracle, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
