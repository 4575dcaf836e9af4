"""Environment faults: an env that raises, hangs past its timeout or answers with malformed output ends
only its own episode (as failed, with the reason), the batch goes on, the faults are counted, and the
broken env is closed and replaced by a fresh one before its next use."""

from __future__ import annotations

import math
import subprocess
import textwrap
import threading
import time
from pathlib import Path

import pytest
from fault_helpers import (
    FaultyLuckyEnv,
    ScriptedEngine,
    assert_same_state,
    child_env,
    inject,
    python,
    snapshot,
    tiny_config,
)

from spear_engine.config_loading import ConfigError, load_config
from spear_engine.models import byte_tokenizer
from spear_engine.rollout.agent_loop import AgentLoop, AgentLoopConfig
from spear_engine.rollout.engine import SamplingParams
from spear_engine.rollout.env_guard import run_with_deadline, step_result_problem
from spear_engine.train.trainer import Trainer, TrainingHalted

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


def make_loop(tokenizer, timeout_s: float | None = TIMEOUT_S, factory=FaultyLuckyEnv) -> AgentLoop:
    config = AgentLoopConfig(max_turns=2, max_prompt_length=4096, max_response_length=64, step_timeout_s=timeout_s)
    return AgentLoop(ScriptedEngine(tokenizer), tokenizer, factory, "faulty_lucky", config)


# (seed, call, fault, expected end, fragment of the recorded reason)
FAULT_CASES = [
    (1, 1, "raise", "env_error", "injected step fault"),
    (2, 1, "hang", "env_timeout", f"no answer within {TIMEOUT_S} s"),
    (3, 1, "not_a_result", "env_error", "expected a StepResult, got dict"),
    (4, 1, "nan_reward", "env_error", "reward must be finite"),
    (5, 1, "inf_reward", "env_error", "reward must be finite"),
    (6, 1, "bad_flag", "env_error", "done must be a bool"),
    (7, 1, "bad_observation", "env_error", "expected an Observation, got str"),
    (8, 0, "raise", "env_error", "reset: RuntimeError('injected reset fault"),
    (9, 0, "hang", "env_timeout", "reset: no answer within"),
    (10, 0, "malformed", "env_error", "reset: malformed result: expected an Observation, got str"),
]
HEALTHY = [11, 12, 13]


def test_each_env_fault_fails_only_its_episode_and_is_counted(tokenizer) -> None:
    for seed, call, fault, _, _ in FAULT_CASES:
        inject("train", seed, call, fault)
    loop = make_loop(tokenizer)
    seeds = [c[0] for c in FAULT_CASES] + HEALTHY
    try:
        start = time.monotonic()
        episodes, timing = loop.run(seeds, group_size=1, params=SamplingParams(max_new_tokens=64))
        elapsed = time.monotonic() - start
    finally:
        loop.close()
    assert elapsed < 20, "a hung env call blocked the batch"  # a hang lasts 60 s unless abandoned
    by_seed = {e.meta["seed"]: e for e in episodes}
    for seed, call, fault, end, reason in FAULT_CASES:
        episode = by_seed[seed]
        assert episode.meta["end"] == end, (fault, episode.meta)
        assert reason in episode.meta["error"], (fault, episode.meta["error"])
        assert not episode.success and episode.reward == 0.0
        assert episode.length == call  # a step fault keeps the turn the policy generated; a reset fault has none
    for seed in HEALTHY:
        assert by_seed[seed].meta["end"] in ("won", "done") and "error" not in by_seed[seed].meta
        assert by_seed[seed].length >= 1
    assert timing["rollout/env_timeouts"] == 2
    assert timing["rollout/env_errors"] == len(FAULT_CASES) - 2
    assert timing["rollout/env_restarts"] == 0


def test_broken_envs_are_closed_and_replaced_before_their_next_use(tokenizer) -> None:
    inject("train", 1, 1, "raise")
    inject("train", 2, 0, "hang")
    loop = make_loop(tokenizer)
    try:
        loop.run([1, 2, 3], group_size=1, params=SamplingParams(max_new_tokens=64))
        first = list(FaultyLuckyEnv.created)
        assert len(first) == 3
        episodes, timing = loop.run([1, 2, 3], group_size=1, params=SamplingParams(max_new_tokens=64))
    finally:
        loop.close()
    assert timing["rollout/env_restarts"] == 2 and timing["rollout/env_errors"] == 0
    assert all(e.meta["end"] in ("won", "done") for e in episodes)  # fresh envs serve the same seeds
    replacements = FaultyLuckyEnv.created[3:]
    assert len(replacements) == 2 and all(env not in first for env in replacements)
    deadline = time.monotonic() + 5
    while not (first[0].closed and first[1].closed) and time.monotonic() < deadline:  # closed in the background
        time.sleep(0.01)
    assert first[0].closed and first[1].closed and first[2].closed  # the healthy one by loop.close()


def test_a_replacement_env_that_cannot_be_built_fails_its_episode_and_is_retried(tokenizer) -> None:
    broken_factory = {"on": False}

    def factory():
        if broken_factory["on"]:
            raise OSError("env server unreachable")
        return FaultyLuckyEnv()

    inject("train", 1, 1, "raise")
    loop = make_loop(tokenizer, factory=factory)
    try:
        loop.run([1, 2], group_size=1, params=SamplingParams(max_new_tokens=64))
        broken_factory["on"] = True
        episodes, timing = loop.run([1, 2], group_size=1, params=SamplingParams(max_new_tokens=64))
        assert episodes[0].meta["end"] == "env_error" and "restart: OSError" in episodes[0].meta["error"]
        assert episodes[1].meta["end"] in ("won", "done") and timing["rollout/env_errors"] == 1
        broken_factory["on"] = False
        episodes, timing = loop.run([1, 2], group_size=1, params=SamplingParams(max_new_tokens=64))
    finally:
        loop.close()
    assert timing["rollout/env_restarts"] == 1 and all(e.meta["end"] in ("won", "done") for e in episodes)


def test_deadline_is_per_call_and_workers_are_bounded() -> None:
    active, peak, lock = [0], [0], threading.Lock()

    def slow(value: int):
        def call():
            with lock:
                active[0] += 1
                peak[0] = max(peak[0], active[0])
            time.sleep(0.2)
            with lock:
                active[0] -= 1
            return value

        return call

    start = time.monotonic()
    outcomes = run_with_deadline([slow(i) for i in range(6)], workers=2, timeout_s=1.5)
    # 6 calls of 0.2 s on 2 workers take 0.6 s in all: past no call's own 1.5 s deadline, whatever the queue
    assert [o.value for o in outcomes] == list(range(6)) and all(o.ok for o in outcomes)
    assert peak[0] == 2 and time.monotonic() - start < 1.5 + 5


def test_step_result_checks() -> None:
    assert step_result_problem(None) == "expected a StepResult, got NoneType"
    from spear_engine.envs.base import Observation, StepResult

    good = StepResult(Observation("x"), 1, True, False, True)
    assert step_result_problem(good) is None
    assert "reward must be a number" in step_result_problem(StepResult(Observation("x"), "1", True, False, True))
    assert "reward must be a number" in step_result_problem(StepResult(Observation("x"), True, True, False, True))
    assert "won must be a bool" in step_result_problem(StepResult(Observation("x"), 0.0, True, 2, True))
    assert "info must be a dict" in step_result_problem(StepResult(Observation("x"), 0.0, True, False, True, []))
    assert "text and task must be str" in step_result_problem(StepResult(Observation(b"x"), 0.0, True, False, True))


def test_env_step_timeout_is_a_config_knob() -> None:
    assert load_config("spear").env.step_timeout_s == 60.0
    with pytest.raises(ConfigError, match=r"env\.step_timeout_s"):
        load_config("spear", ["env.step_timeout_s=0"])


def test_trainer_step_goes_on_through_env_faults_and_counts_them(tmp_path: Path) -> None:
    config = tiny_config("spear", tmp_path, 2, "env.step_timeout_s=1.0")
    trainer = Trainer(config, console=False)
    try:
        assert trainer.agent_loop.config.step_timeout_s == 1.0
        seed0 = config.trainer.seed * 1_000_003  # the first group's seed at step 1 (Trainer._rollout)
        inject("train", seed0, 1, "raise")
        inject("train", seed0 + 1, 1, "hang")
        first = trainer.train_step()
        second = trainer.train_step()
    finally:
        trainer.close()
    assert first["rollout/env_errors"] == 1 and first["rollout/env_timeouts"] == 1
    assert first["episode/count"] == 6 and first["actor/optimizer_steps"] > 0
    assert all(math.isfinite(v) for v in first.values())
    assert second["rollout/env_restarts"] == 2 and second["rollout/env_errors"] == 0


def test_a_step_where_every_env_fails_is_skipped_and_an_outage_halts_the_run(tmp_path: Path) -> None:
    config = tiny_config("spear", tmp_path, 5, "trainer.max_consecutive_skipped_steps=2")
    trainer = Trainer(config, console=False)
    groups, n = config.data.train_batch_size, config.env.rollout.n
    try:
        trainer.train_step()
        before = snapshot(trainer)
        for step in (2, 3):  # every env of steps 2 and 3 fails at reset: no data at all
            for g in range(groups):
                inject("train", config.trainer.seed * 1_000_003 + (step - 1) * groups + g, 0, "raise", times=n)
        skipped = trainer.train_step()
        assert skipped["trainer/step_skipped"] == 1.0 and skipped["rollout/env_errors"] == groups * n
        assert_same_state(before, snapshot(trainer))
        with pytest.raises(TrainingHalted, match="every environment failed"):
            trainer.train_step()
    finally:
        trainer.close()


def test_a_hung_env_thread_does_not_keep_the_process_alive(tmp_path: Path) -> None:
    script = textwrap.dedent("""
        import time
        from fault_helpers import FaultyLuckyEnv, ScriptedEngine, inject
        import fault_helpers
        from spear_engine.models import byte_tokenizer
        from spear_engine.rollout.agent_loop import AgentLoop, AgentLoopConfig
        from spear_engine.rollout.engine import SamplingParams

        fault_helpers.HANG_S = 3600.0
        inject("train", 1, 1, "hang")
        tok = byte_tokenizer()
        loop = AgentLoop(ScriptedEngine(tok), tok, FaultyLuckyEnv, "faulty_lucky",
                         AgentLoopConfig(max_turns=2, step_timeout_s=2.0))
        episodes, _ = loop.run([1], 1, SamplingParams(max_new_tokens=32))
        loop.close()
        print("END", episodes[0].meta["end"], flush=True)
    """)
    start = time.monotonic()
    done = subprocess.run([python(), "-c", script], env=child_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "END env_timeout" in done.stdout
    assert time.monotonic() - start < 60  # the hung call (3600 s) was abandoned, exit did not wait for it
