"""Crash safety of checkpoints: kill -9 at any point of a write leaves the previous checkpoint loadable;
a truncated or corrupted checkpoint is detected by its checksums with a clear error; a killed training
run resumes losing at most the steps since its last checkpoint and ends bit-identical to an
uninterrupted run; the replay index restores byte for byte."""

from __future__ import annotations

import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import fault_helpers
import pytest
import torch
from fault_helpers import (
    assert_same_state,
    checkpoint_content,
    child_env,
    python,
    snapshot,
    state_of_checkpoint,
    tiny_config,
)
from replay_rows import admit_winning_rows

from spear_engine.metrics import read_metrics
from spear_engine.train.checkpoint import (
    CheckpointError,
    checkpoint_dir,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from spear_engine.train.trainer import Trainer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def forkserver():
    """Child processes forked from a clean server that has torch and the checkpoint code imported: a
    child starts in milliseconds, so each test can kill dozens of writers."""
    from multiprocessing import forkserver as server

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["fault_helpers"])
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = child_env()["PYTHONPATH"]  # Python 3.11's server ignores the sys.path it is sent
    try:
        server.ensure_running()
    finally:
        if before is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = before
    yield context
    server._forkserver._stop()  # the server would otherwise live until the test session ends


def step_of(folder: Path) -> int:
    return int(folder.name.removeprefix("step_"))


def assert_loads_exactly(folder: Path, floats: int = 1_000_000) -> None:
    state = load_checkpoint(folder)
    expected = checkpoint_content(step_of(folder), floats)
    assert state["step"] == expected["step"] and state["replay"] == expected["replay"]
    assert torch.equal(state["weights"], expected["weights"])


def leftovers(run: Path) -> list[str]:
    root = checkpoint_dir(run)
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".")) if root.is_dir() else []


def test_sigkill_at_random_times_during_repeated_writes(forkserver, tmp_path: Path) -> None:
    rng = random.Random(20240611)
    run = tmp_path / "run"
    latest, killed_mid_write, kills = None, 0, 50
    for _ in range(kills):
        first = 1 if latest is None else latest + rng.choice([0, 1])  # 0: save the newest step again (a resume)
        started = forkserver.Event()
        writer = forkserver.Process(target=fault_helpers.save_forever, args=(str(run), first, 2, started), daemon=True)
        writer.start()
        assert started.wait(60)
        time.sleep(rng.uniform(0.0, 0.3))  # a write takes ~20-50 ms: the kill lands in one of several writes
        os.kill(writer.pid, signal.SIGKILL)
        writer.join()
        assert writer.exitcode == -signal.SIGKILL
        killed_mid_write += bool(leftovers(run))
        folder = latest_checkpoint(run)
        if latest is not None:
            assert folder is not None and step_of(folder) >= latest, "a complete checkpoint was lost"
        if folder is not None:
            assert_loads_exactly(folder)
            latest = step_of(folder)
    assert latest is not None and latest >= kills // 5  # the writers made progress between the kills
    assert killed_mid_write >= 3, "no kill landed inside a write: the test did not test anything"


@pytest.mark.parametrize("replace", [False, True], ids=["new_step", "same_step_again"])
def test_sigkill_before_each_file_operation_of_a_write(forkserver, tmp_path: Path, replace: bool) -> None:
    """Every point of a write, one by one: kill before its k-th file-system operation, k = 1, 2, ..."""
    points = 0
    for k in range(1, 100):
        run = tmp_path / f"k{k}"
        for step in (1, 2):
            save_checkpoint(run, step, checkpoint_content(step, floats=1000), keep_last=2)
        target = 2 if replace else 3
        writer = forkserver.Process(target=fault_helpers.save_and_die_before, args=(str(run), target, 2, k))
        writer.start()
        writer.join()
        folder = latest_checkpoint(run)
        assert folder is not None and step_of(folder) in ({2} if replace else {2, 3}), (k, folder)
        assert_loads_exactly(folder, floats=1000)
        assert_loads_exactly(checkpoint_dir(run) / "step_00000002", floats=1000)  # the previous one, intact
        save_checkpoint(run, 4, checkpoint_content(4, floats=1000), keep_last=2)  # the run goes on and cleans up
        assert leftovers(run) == [] and step_of(latest_checkpoint(run)) == 4
        if writer.exitcode == 0:  # k is past the last operation: the write completed
            assert step_of(folder) == target
            break
        assert writer.exitcode == -signal.SIGKILL
        points += 1
    assert points >= 8, f"only {points} kill points: the write has fewer operations than expected"


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("truncate", "truncated"),
        ("flip_byte", "fails its SHA-256 checksum (corrupted)"),
        ("delete_file", "is missing"),
        ("delete_manifest", "is not a complete checkpoint (no manifest.json)"),
        ("garble_manifest", "manifest.json is corrupted"),
    ],
)
def test_a_damaged_checkpoint_is_detected_with_a_clear_error(tmp_path: Path, damage: str, message: str, capsys) -> None:
    run = tmp_path / "run"
    for step in (1, 2):
        save_checkpoint(run, step, checkpoint_content(step, floats=1000), keep_last=3)
    newest = list_checkpoints(run)[-1]
    state = newest / "state_rank0.pt"
    if damage == "truncate":
        state.write_bytes(state.read_bytes()[:-10])
    elif damage == "flip_byte":
        data = bytearray(state.read_bytes())
        data[len(data) // 2] ^= 0x01
        state.write_bytes(bytes(data))
    elif damage == "delete_file":
        state.unlink()
    elif damage == "delete_manifest":
        (newest / "manifest.json").unlink()
    else:
        (newest / "manifest.json").write_text('{"files": ')
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(newest)
    text = str(error.value)
    assert message in text and str(newest) in text and "trainer.resume=auto" in text  # problem, where, and the fix
    assert latest_checkpoint(run) == list_checkpoints(run)[0]  # resume falls back to the previous one
    assert "skipping checkpoint" in capsys.readouterr().out


def test_replay_index_restores_byte_for_byte(tmp_path: Path) -> None:
    trainer = Trainer(tiny_config("spear", tmp_path, 3), console=False)
    try:
        for _ in range(3):
            trainer.train_step()
        admit_winning_rows(trainer.sil, trainer.global_step)
        assert len(trainer.sil) >= 8
        saved = {k: bytes(v) for k, v in trainer.sil.state_dict().items()}
        folder = trainer.save()
        draw = trainer.sil.draw(4, on_policy_rows=6)[0]
    finally:
        trainer.close()
    resumed = Trainer(tiny_config("spear", tmp_path, 3), console=False)
    try:
        assert resumed.global_step == 3
        assert load_checkpoint(folder)["replay"] == saved
        assert {k: bytes(v) for k, v in resumed.sil.state_dict().items()} == saved
        again = resumed.sil.draw(4, on_policy_rows=6)[0]  # the index's RNG came back too: the same draw
        assert draw is not None and again is not None and list(again.row_ids) == list(draw.row_ids)
    finally:
        resumed.close()


TRAIN_CHILD = textwrap.dedent("""
    import sys
    import fault_helpers  # registers the faulty_lucky environment
    from spear_engine.cli import main

    sys.exit(main(["train", "--preset", "spear", *fault_helpers.tiny_args(sys.argv[1], int(sys.argv[2]),
                   "trainer.save_freq=2"), "--no-progress"]))
""")


def _comparable(record: dict) -> dict:
    return {k: v for k, v in record.items() if not k.startswith(("time/", "perf/", "share/"))}


def test_a_killed_training_run_resumes_and_ends_like_an_uninterrupted_one(tmp_path: Path) -> None:
    steps, save_freq = 12, 2
    killed = tmp_path / "killed"
    log = (tmp_path / "child.log").open("w")
    child = subprocess.Popen([python(), "-c", TRAIN_CHILD, str(killed), str(steps)], env=child_env(), stdout=log,
                             stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while child.poll() is None and time.monotonic() < deadline:
            if any(step_of(c) >= 4 for c in list_checkpoints(killed / "run")):
                break
            time.sleep(0.05)
        time.sleep(random.Random(7).uniform(0.0, 0.6))  # somewhere in steps 5-6 or the write of checkpoint 6
        assert child.poll() is None, "the child finished before it could be killed: " + (tmp_path / "child.log").read_text()[-2000:]
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
        log.close()
    folder = latest_checkpoint(killed / "run")
    assert folder is not None
    reached = max(r["step"] for r in read_metrics(killed / "run"))
    assert reached - step_of(folder) <= save_freq  # at most the steps since the last checkpoint are lost

    resumed = Trainer(tiny_config("spear", killed, steps, f"trainer.save_freq={save_freq}"), console=False)
    assert resumed.global_step == step_of(folder)
    resumed.fit()
    reference = Trainer(tiny_config("spear", tmp_path / "straight", steps, f"trainer.save_freq={save_freq}"),
                        console=False)  # fmt: skip
    reference.fit()
    assert_same_state(snapshot(reference), snapshot(resumed))
    final = state_of_checkpoint(load_checkpoint(latest_checkpoint(killed / "run")))
    assert_same_state(snapshot(reference), final)
    records, expected = read_metrics(killed / "run"), read_metrics(tmp_path / "straight" / "run")
    assert [r["step"] for r in records] == list(range(1, steps + 1))  # no step twice, none missing
    for a, b in zip(records, expected):
        assert _comparable(a) == _comparable(b), a["step"]
    shutil.rmtree(tmp_path / "straight")
