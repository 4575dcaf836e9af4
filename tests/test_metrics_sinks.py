"""The TensorBoard and Weights & Biases metric sinks: what they log is read back from the files they write
(TensorBoard event files; W&B's offline run log) and compared value by value with what was logged."""

from __future__ import annotations

import json
import math
import struct
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest

from spear_engine.metrics import TensorBoardSink, WandbSink, build_logger, read_metrics

STEPS = {
    1: {"episode/success_rate": 0.125, "actor/pg_loss": -0.03125, "trajectory_sft_buffersize": 0, "time/step": 12.5},
    2: {"episode/success_rate": 0.625, "actor/pg_loss": 0.25, "trajectory_sft_buffersize": 12, "time/step": 11.0},
    3: {"episode/success_rate": 0.0, "actor/pg_loss": float("nan"), "trajectory_sft_buffersize": 20, "time/step": 9.75},
}
"""Three steps as the trainer logs them; step 3's NaN loss is not a number a sink can plot."""


def tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def expected_series() -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = {}
    for step, metrics in STEPS.items():
        for key, value in metrics.items():
            if math.isfinite(value):
                series.setdefault(key, []).append((step, float(value)))
    return series


def assert_same_series(got: dict[str, list[tuple[int, float]]], want: dict[str, list[tuple[int, float]]]) -> None:
    assert sorted(got) == sorted(want)
    for key, points in want.items():
        assert [s for s, _ in got[key]] == [s for s, _ in points], key
        assert [v for _, v in got[key]] == pytest.approx([v for _, v in points], rel=1e-6), key  # float32 on disk


def test_tensorboard_sink_writes_every_finite_scalar_at_its_step(tmp_path: Path) -> None:
    sink = TensorBoardSink(tmp_path)
    for step, metrics in STEPS.items():
        sink.log(step, metrics)
    sink.close()
    got = tensorboard_scalars(tmp_path / "tensorboard")
    assert_same_series(got, expected_series())
    assert got["actor/pg_loss"] == [(1, -0.03125), (2, 0.25)]  # the NaN of step 3 is left out


def test_logger_fans_out_to_jsonl_and_tensorboard_alike(tmp_path: Path) -> None:
    logger = build_logger(["jsonl", "tensorboard"], tmp_path, total_steps=3, resume_step=None)
    for step, metrics in STEPS.items():
        logger.log(step, metrics)
    logger.close()
    from_jsonl: dict[str, list[tuple[int, float]]] = {}
    for record in read_metrics(tmp_path):
        for key, value in record.items():
            if key != "step" and value is not None:
                from_jsonl.setdefault(key, []).append((record["step"], float(value)))
    assert_same_series(tensorboard_scalars(tmp_path / "tensorboard"), from_jsonl)
    assert_same_series(from_jsonl, expected_series())


# ------------------------------------------------------------------------------------------------
# Weights & Biases
# ------------------------------------------------------------------------------------------------
class FakeRun:
    def __init__(self, calls: list) -> None:
        self.calls = calls

    def log(self, data: dict, step: int | None = None) -> None:
        self.calls.append(("log", dict(data), step))

    def finish(self) -> None:
        self.calls.append(("finish",))


def test_wandb_sink_calls_the_wandb_api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sink's contract with ``wandb`` (init with project / name / config / dir, one log per step with
    ``step=``, finish on close), against a fake module: runs whether or not wandb is installed."""
    calls: list = []
    fake = types.ModuleType("wandb")
    fake.init = lambda **kwargs: calls.append(("init", kwargs)) or FakeRun(calls)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "wandb", fake)
    sink = WandbSink(tmp_path, "proj", "my-run", {"actor": {"lr": 0.01}})
    for step, metrics in STEPS.items():
        sink.log(step, metrics)
    sink.close()
    assert calls[0] == ("init", {"project": "proj", "name": "my-run", "config": {"actor": {"lr": 0.01}},
                                 "dir": str(tmp_path)})  # fmt: skip
    logged = calls[1:-1]
    assert [(c[0], c[2]) for c in logged] == [("log", 1), ("log", 2), ("log", 3)]
    for _, data, step in logged:
        assert data.keys() == STEPS[step].keys()
        assert all(data[k] == v or (math.isnan(v) and math.isnan(data[k])) for k, v in STEPS[step].items())
    assert calls[-1] == ("finish",)


def read_wandb_records(path: Path) -> list:
    """The protobuf records of a ``run-<id>.wandb`` file: a 7-byte header (``:W&B``, magic, version), then
    LevelDB log records (4-byte CRC, 2-byte length, 1-byte type: 1 full, 2 first, 3 middle, 4 last) in
    32 KiB blocks whose last < 7 bytes are padding."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    if len(data) < 7:  # created, header not written yet
        return []
    assert data[:4] == b":W&B", data[:7]
    block, pos, chunks, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if (kind == 0 and length == 0) or pos + 7 + length > len(data):  # zero padding, or still being written
            break
        chunks += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            records.append(record)
            chunks = b""
    return records


def test_wandb_offline_run_holds_the_logged_history(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb", reason="wandb is pinned in requirements-dev.txt: pip install -r requirements-dev.txt")
    for var, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off",
                       "WANDB_CONFIG_DIR": tmp_path / "config", "WANDB_CACHE_DIR": tmp_path / "cache",
                       "WANDB_DATA_DIR": tmp_path / "data", "WANDB_DISABLE_GIT": "true"}.items():  # fmt: skip
        monkeypatch.setenv(var, str(value))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    sink = WandbSink(run_dir, "spear-test", "wandb-offline", {"actor": {"lr": 0.01}, "preset": "spear"})
    for step, metrics in STEPS.items():
        sink.log(step, metrics)
    sink.close()

    deadline = time.monotonic() + 120  # finish() can return before wandb-core has written the log (seen: 1 in 4)
    while True:
        log_files = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
        records = read_wandb_records(log_files[0]) if len(log_files) == 1 else []
        kinds = [r.WhichOneof("record_type") for r in records]
        if "exit" in kinds or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert len(log_files) == 1, log_files
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (run.project, run.display_name) == ("spear-test", "wandb-offline")
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["actor"] == {"lr": 0.01} and config["preset"] == "spear"

    history = [r.history for r in records if r.WhichOneof("record_type") == "history"]
    assert [h.step.num for h in history] == [1, 2, 3]
    got: dict[str, list[tuple[int, float]]] = {}
    for h in history:
        for item in h.item:
            key = item.key or "/".join(item.nested_key)
            if not key.startswith("_"):  # wandb's own _step, _runtime, _timestamp
                got.setdefault(key, []).append((h.step.num, json.loads(item.value_json)))
    nan_loss = got["actor/pg_loss"].pop()  # W&B keeps the NaN (its charts skip it)
    assert nan_loss[0] == 3 and (nan_loss[1] == "NaN" or math.isnan(float(nan_loss[1])))
    assert_same_series(got, expected_series())
    assert "exit" in kinds  # finish() closed the run


def test_episode_metrics_are_means_over_every_ranks_episodes() -> None:
    from types import SimpleNamespace

    from spear_engine.metrics import episode_metrics

    def ep(success: bool, reward: float, length: int, calls: int) -> SimpleNamespace:
        return SimpleNamespace(success=success, reward=reward, length=length, tool_calls=calls)

    mine = [ep(True, 10.0, 3, 2), ep(False, 0.0, 5, 1)]
    other_rank = np.array([1.0, 10.0, 2.0, 4.0, 2.0])  # two episodes: one win, lengths 2 in all, 4 tool calls
    m = episode_metrics(mine, lambda totals: totals + other_rank)
    assert m["episode/success_rate"] == 2 / 4 and m["episode/reward/mean"] == 20.0 / 4
    assert m["episode/length/mean"] == 10 / 4 and m["episode/tool_calls/mean"] == 7 / 4
    assert m["episode/count"] == 4 and m["episode/length/max"] == 5  # the longest is this rank's
    assert episode_metrics([])["episode/success_rate"] == 0.0  # no episodes: no division by zero


def test_stage_clock_times_each_stage_and_the_step() -> None:
    from spear_engine.metrics import StageClock

    clock = StageClock()
    with clock("rollout"):
        time.sleep(0.01)
    with pytest.raises(RuntimeError), clock("update"):  # a stage that raises is still timed
        raise RuntimeError
    timings = clock.total()
    assert set(timings) == {"time/rollout", "time/update", "time/step"}
    assert timings["time/rollout"] >= 0.01 and timings["time/step"] >= timings["time/rollout"] + timings["time/update"]
