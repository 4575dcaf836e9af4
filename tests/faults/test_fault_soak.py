"""Soak: the tiny model trains for many steps through `Trainer.fit` while faults are injected at random
points — env errors, hangs and malformed results in the evaluation rollouts (a separate rollout whose
results are thrown away; the envs it breaks are replaced and then serve training), NaN losses in some
updates, and a checkpoint write killed half-way (the run is then rebuilt from disk, as after a crash, and
resumes from the previous checkpoint).

The claim tested: none of this changes the training state. The final model, optimizer state and replay
bytes equal those of a run without evaluations, without faults and without the crash, in which each step
whose update was NaN is a no-op (only the step counter advances — what a skipped step promises). Memory
stays flat: RSS after the warm-up vs at the end, live tensors, threads, and the crashed trainer is freed.
"""

from __future__ import annotations

import gc
import random
import threading
import time
import warnings
import weakref
from pathlib import Path

import fault_helpers
import pytest
import torch
from fault_helpers import assert_same_state, inject, nan_forward, rss_mb, snapshot, tiny_config

from spear_engine.metrics import read_metrics
from spear_engine.train import checkpoint
from spear_engine.train.checkpoint import latest_checkpoint, load_checkpoint
from spear_engine.train.trainer import Trainer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
STEPS, SAVE_FREQ, TEST_FREQ, VAL_EPISODES = 24, 4, 3, 4
RSS_TOLERANCE_MB = 48
"""RSS growth allowed between the warm-up of the restarted trainer (an eval and a save after the restart)
and the end (step 24). Measured: +0 to +10 MB (allocator noise). What the run keeps on purpose is small
(the replay index is capped at a few hundred KB); one retained autograd graph or step batch of the tiny
model is tens of MB, repeated over the >= 4 steps after the probe: that exceeds the bound. A leaked
crashed trainer is caught by its weak reference."""
TENSOR_TOLERANCE = 50
"""Live tensors may not grow by more than this (a leak of 3 tensors per step over ~20 steps exceeds it)."""
EVAL_FAULTS = ("raise", "hang", "not_a_result", "nan_reward", "bad_flag", "bad_observation")


class SimulatedKill(BaseException):
    """The process dies here (not an Exception: nothing may catch it)."""


def _tensors() -> int:
    with warnings.catch_warnings():  # isinstance() on some library objects warns about deprecated aliases
        warnings.simplefilter("ignore")
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def test_soak_with_faults_ends_in_the_state_of_a_fault_free_run(tmp_path: Path, monkeypatch) -> None:
    rng = random.Random(5)
    killed_save = rng.choice([s for s in range(2 * SAVE_FREQ, STEPS, SAVE_FREQ)])
    replayed = rng.randint(killed_save - SAVE_FREQ + 1, killed_save)  # a NaN step lost in the crash, run again
    nan_steps = {replayed, *rng.sample(range(3, STEPS + 1), 3)}
    monkeypatch.setattr(fault_helpers, "HANG_S", 3.0)  # abandoned hung calls end on their own
    extra = [f"trainer.save_freq={SAVE_FREQ}", "env.step_timeout_s=1.0", f"trainer.val_episodes={VAL_EPISODES}"]
    probes: dict[str, float] = {}
    probe_step = {"at": 5}  # after the first eval, save and skip; moved past the restart after the crash
    counts = {"eval_faults": 0, "killed": 0, "nan": 0}
    rename = checkpoint.os.rename

    def instrument(trainer: Trainer) -> Trainer:
        step, run_eval, save = trainer.train_step, trainer.evaluate, trainer.save

        def train_step():
            if trainer.global_step + 1 in nan_steps:
                counts["nan"] += 1
                original = trainer.learner.forward
                trainer.learner.forward = nan_forward(original)
                try:
                    return step()
                finally:
                    del trainer.learner.forward
            metrics = step()
            if trainer.global_step == probe_step["at"] and "warm_rss" not in probes:
                gc.collect()
                probes.update(warm_rss=rss_mb(), warm_tensors=_tensors(), warm_threads=threading.active_count())
            return metrics

        def evaluate(*args, **kwargs):
            for _ in range(2):
                seed, call = rng.randrange(VAL_EPISODES), rng.randrange(3)
                inject("eval", seed, call, "raise" if call == 0 else rng.choice(EVAL_FAULTS))
            counts["eval_faults"] += 2
            return run_eval(*args, **kwargs)

        def killable_save():
            if trainer.global_step != killed_save or counts["killed"]:
                return save()
            counts["killed"] += 1

            def die_on_rename(src, dst):
                raise SimulatedKill  # after the files, before the rename: the new checkpoint never appears

            monkeypatch.setattr(checkpoint.os, "rename", die_on_rename)
            try:
                return save()
            finally:
                monkeypatch.setattr(checkpoint.os, "rename", rename)

        trainer.train_step, trainer.evaluate, trainer.save = train_step, evaluate, killable_save
        return trainer

    start = time.monotonic()
    config = tiny_config("spear", tmp_path / "faulty", STEPS, f"trainer.test_freq={TEST_FREQ}", *extra)
    trainer = instrument(Trainer(config, console=False))
    with pytest.raises(SimulatedKill):
        trainer.fit()
    crashed = weakref.ref(trainer)
    del trainer
    gc.collect()  # what the death of the process frees
    assert crashed() is None, "the crashed trainer is still referenced"
    assert counts["killed"] == 1 and (tmp_path / "faulty" / "run" / "checkpoints" / f".tmp-step_{killed_save:08d}").is_dir()
    trainer = instrument(Trainer(config, console=False))  # the restarted process
    assert trainer.global_step == killed_save - SAVE_FREQ  # lost: the steps since the last checkpoint
    # Memory is probed again in the restarted trainer (a new process in real life): across the rebuild the
    # allocator lands tens of MB higher or lower at random (measured -46 to +86 MB with flat tensor counts),
    # and that the crashed trainer itself was freed is asserted above.
    probes.clear()
    probe_step["at"] = trainer.global_step + SAVE_FREQ  # after an eval and a save of the restarted run
    trainer.fit()
    gc.collect()
    end_rss, end_tensors = rss_mb(), _tensors()
    faulty = snapshot(trainer)
    faulty_elapsed = time.monotonic() - start

    reference = Trainer(tiny_config("spear", tmp_path / "clean", STEPS, "trainer.test_freq=0", *extra), console=False)
    try:
        while reference.global_step < STEPS:
            if reference.global_step + 1 in nan_steps:
                reference.global_step += 1  # a no-op step
            else:
                reference.train_step()
        assert_same_state(snapshot(reference), faulty)
    finally:
        reference.close()

    records = read_metrics(tmp_path / "faulty" / "run")
    assert [r["step"] for r in records] == list(range(0, STEPS + 1))  # step 0: the evaluation before training
    assert sorted(r["step"] for r in records if r.get("trainer/step_skipped")) == sorted(nan_steps)
    assert sum(r.get("val/env_errors", 0) + r.get("val/env_timeouts", 0) for r in records) > 0  # counted in eval
    assert sum(r.get("rollout/env_restarts", 0) for r in records) > 0  # eval faults broke envs; training replaced them
    assert counts["eval_faults"] >= 10 and counts["nan"] > len(nan_steps)  # NaN steps replayed after the crash
    assert_same_state(faulty, {k: v for k, v in _checkpoint_parts(tmp_path / "faulty" / "run").items()})
    print(f"soak: {faulty_elapsed:.1f} s, RSS {probes['warm_rss']:.0f} -> {end_rss:.0f} MB, tensors "
          f"{probes['warm_tensors']} -> {end_tensors}, nan steps {sorted(nan_steps)}, killed save {killed_save}")
    assert end_rss - probes["warm_rss"] < RSS_TOLERANCE_MB, (probes, end_rss)
    assert end_tensors - probes["warm_tensors"] < TENSOR_TOLERANCE, (probes["warm_tensors"], end_tensors)
    deadline = time.monotonic() + 10
    while threading.active_count() > probes["warm_threads"] and time.monotonic() < deadline:
        time.sleep(0.1)  # hung env calls end after HANG_S
    assert threading.active_count() <= probes["warm_threads"]
    # No wall-time bound: on a loaded machine any bound is a coin toss. That hung calls never block the run
    # is asserted by the env timeouts counted above and in test_fault_env (a 60 s hang vs the 1 s deadline).


def _checkpoint_parts(run: Path) -> dict:
    state = load_checkpoint(latest_checkpoint(run))
    return {"model": state["backend"]["model"], "optimizer": state["backend"]["optimizer"], "replay": state["replay"]}
