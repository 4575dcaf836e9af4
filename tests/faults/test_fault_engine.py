"""Rollout engine faults: an engine that dies is rebuilt and re-synced with the current weights, then the
call is retried once; a weight sync that fails is retried with a fresh stream of weights, then fails
loudly. Unit tests on a fake engine, the trainer with an own-weights engine that fails on demand (its
run must equal a fault-free run, which it only does if the restarted engine got the current weights),
and the real vLLM engine on the tiny model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from fault_helpers import assert_same_state, snapshot, tiny_config

from spear_engine.rollout.engine import Generation, SamplingParams
from spear_engine.rollout.resilient import EngineFailure, ResilientEngine, WeightSyncError
from spear_engine.train import build as build_module
from spear_engine.train.trainer import Trainer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class FakeEngine:
    """Generates its weight ``w`` as the token; fails on demand (``plan`` is shared by every instance)."""

    name = "fake"

    def __init__(self, plan: dict[str, int], built: list[FakeEngine]) -> None:
        self.plan, self.w, self.closed = plan, 0.0, False
        built.append(self)

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Generation]:
        if self.plan.get("bad_request"):
            raise ValueError("prompt longer than the model's context")
        if self.plan.get("generate_failures", 0) > 0:
            self.plan["generate_failures"] -= 1
            raise RuntimeError("engine core died")
        return [Generation([int(self.w)], [-1.0], "stop") for _ in prompts]

    def load_weights(self, named_tensors) -> None:
        for _, tensor in named_tensors:
            if self.plan.get("sync_failures", 0) > 0:
                self.plan["sync_failures"] -= 1
                self.w = -1.0  # half-updated when it fails
                raise ConnectionError("weight bucket lost")
            self.w = float(tensor)

    def close(self) -> None:
        self.closed = True


def make(plan: dict[str, int], current: dict[str, float]) -> tuple[ResilientEngine, list[FakeEngine], list[int]]:
    built: list[FakeEngine] = []
    pulls: list[int] = []

    def source():
        pulls.append(1)
        return iter([("w", torch.tensor(current["w"]))])

    return ResilientEngine(lambda: FakeEngine(plan, built), source, sync_attempts=3, retry_delay_s=0.0), built, pulls


def test_a_dead_engine_is_rebuilt_resynced_and_the_call_retried() -> None:
    plan, current = {}, {"w": 7.0}
    engine, built, pulls = make(plan, current)
    engine.load_weights(iter([("w", torch.tensor(7.0))]))
    plan["generate_failures"] = 1
    out = engine.generate([[1], [2]], SamplingParams())
    assert [g.token_ids for g in out] == [[7], [7]]  # the new engine samples from the current weights
    assert len(built) == 2 and built[0].closed and not built[1].closed
    assert engine.restarts == 1 and len(pulls) == 1 and engine.metrics()["rollout/engine_restarts"] == 1.0


def test_an_engine_that_fails_again_after_its_restart_fails_loudly() -> None:
    plan = {"generate_failures": 2}
    engine, built, _ = make(plan, {"w": 1.0})
    with pytest.raises(EngineFailure, match=r"was restarted and re-synced, and failed again.*rollout.name=hf"):
        engine.generate([[1]], SamplingParams())
    assert len(built) == 2


def test_a_bad_request_is_not_retried() -> None:
    engine, built, _ = make({"bad_request": 1}, {"w": 1.0})
    with pytest.raises(ValueError, match="prompt longer"):
        engine.generate([[1]], SamplingParams())
    assert len(built) == 1 and engine.restarts == 0


def test_a_failed_weight_sync_is_retried_with_fresh_weights() -> None:
    plan, current = {"sync_failures": 2}, {"w": 3.0}
    engine, built, pulls = make(plan, current)
    engine.load_weights(iter([("w", torch.tensor(3.0))]))
    assert built[0].w == 3.0 and engine.sync_retries == 2 and len(pulls) == 2  # not left half-updated


def test_a_weight_sync_that_keeps_failing_stops_with_a_clear_error() -> None:
    plan = {"sync_failures": 10}
    engine, _, pulls = make(plan, {"w": 3.0})
    with pytest.raises(WeightSyncError) as failed:
        engine.load_weights(iter([("w", torch.tensor(3.0))]))
    message = str(failed.value)
    assert "failed 3 time(s)" in message and "ConnectionError('weight bucket lost')" in message
    assert "stale weights" in message and "resume" in message and len(pulls) == 2


@pytest.fixture
def own_weights_engine(monkeypatch):
    """The trainer's HF engine holds its own copy of the weights (as vLLM does) and fails on demand."""
    from spear_engine.models import load_model
    from spear_engine.rollout.hf import HFEngine

    plan = {"generate_failures": 0, "sync_failures": 0, "built": 0}

    class FlakyHF(HFEngine):
        def generate(self, prompts, params):
            if plan["generate_failures"] > 0:
                plan["generate_failures"] -= 1
                raise RuntimeError("engine core died")
            return super().generate(prompts, params)

        def load_weights(self, named_tensors):
            if plan["sync_failures"] > 0:
                plan["sync_failures"] -= 1
                raise ConnectionError("weight bucket lost")
            super().load_weights(named_tensors)

    def factory(config, engine_name, backend, device):
        def build():
            plan["built"] += 1
            return FlakyHF(load_model(config.model.path, dtype=config.model.dtype)[0], share=True)

        return build, False

    monkeypatch.setattr(build_module, "engine_factory", factory)
    return plan


def test_trainer_survives_engine_death_and_sync_failures_with_the_same_result(tmp_path: Path, own_weights_engine) -> None:
    plan = own_weights_engine

    def run(folder: Path, faults: bool) -> tuple[dict, list[dict]]:
        trainer = Trainer(tiny_config("spear", folder, 4), console=False)
        assert isinstance(trainer.engine, ResilientEngine) and not trainer.engine_shares_weights
        history = []
        try:
            for step in range(1, 5):
                if faults and step == 2:
                    plan["generate_failures"] = 1  # dies in the rollout of step 2
                if faults and step == 3:
                    plan["sync_failures"] = 2  # the sync after the update of step 3 fails twice
                history.append(trainer.train_step())
            return snapshot(trainer), history
        finally:
            trainer.close()

    clean, clean_history = run(tmp_path / "clean", faults=False)
    built_clean = plan["built"]
    faulty, faulty_history = run(tmp_path / "faulty", faults=True)
    assert plan["built"] - built_clean == 2  # the first engine and one restart
    assert faulty_history[1]["rollout/engine_restarts"] == 1.0
    assert faulty_history[3]["rollout/weight_sync_retries"] == 2.0
    assert_same_state(clean, faulty)  # same rollouts, so the restarted engine had the current weights
    for a, b in zip(clean_history, faulty_history):
        assert a["mismatch/kl"] == b["mismatch/kl"] and a["episode/reward/mean"] == b["episode/reward/mean"]


def test_a_dead_vllm_engine_is_restarted_and_resynced() -> None:
    from spear_engine import models
    from spear_engine.rollout.vllm import VLLMEngine, VLLMNotAvailableError, import_vllm
    from spear_engine.rollout.weight_sync import iter_named_weights

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    try:
        import_vllm()
    except VLLMNotAvailableError as err:
        pytest.skip(str(err))
    path = models.model_dir(models.TINY)
    trained, _ = models.load_model(path)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in trained.parameters():  # stands in for the trained weights, far from the checkpoint's
            param.add_(torch.randn(param.shape, generator=generator) * 0.2)
    built: list[VLLMEngine] = []

    def factory() -> VLLMEngine:
        built.append(VLLMEngine(path, kv_cache_gb=0.25))
        return built[-1]

    engine = ResilientEngine(factory, lambda: iter_named_weights(trained), retry_delay_s=0.0)
    try:
        engine.load_weights(iter_named_weights(trained))
        prompts, greedy = [[1, 5, 9, 13], [2, 4, 6]], SamplingParams(max_new_tokens=6, temperature=0.0)
        expected = [g.token_ids for g in engine.generate(prompts, greedy)]
        built[0].close()  # the engine dies: its next generate raises
        after = [g.token_ids for g in engine.generate(prompts, greedy)]
        assert engine.restarts == 1 and len(built) == 2
        assert after == expected  # the new engine samples from the trained weights, not the checkpoint's
        untrained = models.load_model(path)[0]
        from spear_engine.rollout.hf import HFEngine

        assert [g.token_ids for g in HFEngine(untrained).generate(prompts, greedy)] != expected  # the test can fail
    finally:
        engine.close()
