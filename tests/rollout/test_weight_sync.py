"""``sync_weights`` is the one weight-sync path: what the trainer does, on a recording fake engine."""

from __future__ import annotations

import pytest
import torch

from spear_engine.rollout.weight_sync import sync_weights


class RecordingEngine:
    def __init__(self, sleep_mode: bool = True) -> None:
        self.log: list[tuple] = []
        if not sleep_mode:
            self.wake_up = None  # type: ignore[assignment]

    def wake_up(self, tags=None) -> None:
        self.log.append(("wake_up", tags))

    def load_weights(self, named_tensors) -> None:
        self.log.append(("load_weights", [name for name, _ in named_tensors]))


def model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))


def test_wakes_the_weights_then_loads_everything_in_one_stream() -> None:
    engine, net = RecordingEngine(), model()
    stats = sync_weights(net, engine, bucket_mb=1e-5)  # a bucket per module
    assert engine.log == [("wake_up", ["weights"]), ("load_weights", ["0.weight", "0.bias", "2.weight", "2.bias"])]
    assert stats.tensors == 4 and stats.buckets == 2 and stats.bytes == 4 * (12 + 4 + 8 + 2)


def test_engine_without_sleep_mode_and_rank_without_engine() -> None:
    engine, net = RecordingEngine(sleep_mode=False), model()
    sync_weights(net, engine)
    assert [entry[0] for entry in engine.log] == ["load_weights"]
    assert sync_weights(net, None).tensors == 4  # only walks the (ZeRO-3) gathers


def test_shared_weights_are_a_no_op() -> None:
    engine = RecordingEngine()
    stats = sync_weights(model(), engine, shares_weights=True)
    assert engine.log == [] and stats.tensors == 0


def test_arguments_in_the_wrong_order_are_an_error() -> None:
    with pytest.raises(TypeError, match="model must be a torch module"):
        sync_weights(RecordingEngine(), model())  # type: ignore[arg-type]
