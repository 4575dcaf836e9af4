"""``spear experiment --status``: each run's state read from a results folder written by hand."""

from __future__ import annotations

import json
from pathlib import Path

from spear_engine.cli import main as cli_main
from spear_engine.experiment import ArmSpec, ExperimentSpec
from spear_engine.experiment_status import experiment_status, run_status

SPEC = ExperimentSpec(seeds=[0, 1], steps=8, arms={"drbot": ArmSpec(preset="drbot"), "spear": ArmSpec(preset="spear")})


def _run(folder: Path, arm: str, seed: int, *, done: dict | None = None, checkpoint: int | None = None,
         metrics: bool = False, machine: str | None = None) -> Path:  # fmt: skip
    run = folder / "runs" / arm / f"seed{seed}"
    run.mkdir(parents=True)
    if done is not None:
        (run / "done.json").write_text(json.dumps(done))
    if checkpoint is not None:
        (run / "checkpoints" / f"step_{checkpoint:08d}").mkdir(parents=True)
        (run / "checkpoints" / f".tmp-step_{checkpoint + 1:08d}").mkdir()  # an interrupted write: not counted
    if metrics:
        (run / "metrics.jsonl").write_text('{"step": 0}\n')
    if machine is not None:
        (run / "machines.jsonl").write_text(json.dumps({"after_step": 0, "machine": machine}) + "\n")
    return run


def test_each_state_of_a_run(tmp_path: Path) -> None:
    done = _run(tmp_path, "drbot", 0, done={"steps": 8, "resumed_from": 0, "wall_s": 600.0}, machine="cpu A")
    resumed = _run(tmp_path, "drbot", 1, done={"steps": 8, "resumed_from": 4, "wall_s": 300.0})
    interrupted = _run(tmp_path, "spear", 0, checkpoint=4, metrics=True)
    no_checkpoint = _run(tmp_path, "spear", 1, metrics=True)
    shorter = _run(tmp_path, "spear", 2, done={"steps": 4, "resumed_from": 0, "wall_s": 100.0})
    assert run_status(done, 0, "drbot", 8).state == "done"
    assert run_status(done, 0, "drbot", 8).detail == "8 steps, 10.0 min on cpu A"
    assert run_status(done, 0, "drbot", 8).wall_s == 600.0
    assert run_status(resumed, 1, "drbot", 8).wall_s is None  # a resumed run does not tell a whole run's pace
    assert "from its step-4 checkpoint" in run_status(resumed, 1, "drbot", 8).detail
    status = run_status(interrupted, 0, "spear", 8)
    assert (status.state, status.detail) == ("resumes", "from its step-4 checkpoint, 4 steps to go")
    assert run_status(no_checkpoint, 1, "spear", 8).state == "starts over"
    assert run_status(shorter, 2, "spear", 8).state == "starts over"  # --steps 8 after a 4-step run, no checkpoint
    assert run_status(tmp_path / "runs" / "grpo" / "seed0", 0, "grpo", 8).state == "not started"


def test_the_report_names_warmups_to_retrain_and_the_time_left(tmp_path: Path) -> None:
    _run(tmp_path, "drbot", 0, done={"steps": 8, "resumed_from": 0, "wall_s": 600.0})
    _run(tmp_path, "spear", 0, done={"steps": 8, "resumed_from": 0, "wall_s": 1800.0})
    _run(tmp_path, "drbot", 1, checkpoint=4)
    warm = tmp_path / "warmup" / "seed1"
    warm.mkdir(parents=True)
    (warm / "eval.json").write_text("{}")  # committed evaluation, weights not committed
    report = experiment_status(SPEC, tmp_path)
    lines = report.splitlines()
    assert lines[1] == "seed 0: every run done"
    assert lines[4].startswith("seed 1: warm-up evaluation recorded, weights missing: trained again")
    assert "2 done, 1 resumes, 1 not started" in report
    assert "about 0.7 h left at the median pace of the 2 runs finished in one go (20 min a run" in report  # 2 x 20 min


def test_status_from_the_command_line_runs_nothing(tmp_path: Path, capsys) -> None:
    assert cli_main(["experiment", "twc-cpu", "--out", str(tmp_path / "twc"), "--seeds", "7", "--status"]) == 0
    out = capsys.readouterr().out
    assert "5 arms x 1 seeds x 16 steps" in out and "seed 7: warm-up not trained yet" in out
    assert "5 not started" in out
    assert not (tmp_path / "twc").exists()  # nothing written
