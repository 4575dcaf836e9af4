"""Replay storage for SPEAR self-imitation (contract: docs/replay_index_spec.md).

``ReplayIndex`` and ``BaselineWindow`` are the C++ implementations (pybind11 module
``spear_engine._replay_index``); ``NumpyReplayIndex`` and ``NumpyBaselineWindow`` are the plain-numpy
oracle with the same API, the same draws and the same byte format.
"""

from spear_engine._replay_index import BaselineWindow, ReplayIndex
from spear_engine.replay.oracle import NumpyBaselineWindow, NumpyReplayIndex

__all__ = ["BaselineWindow", "NumpyBaselineWindow", "NumpyReplayIndex", "ReplayIndex"]
