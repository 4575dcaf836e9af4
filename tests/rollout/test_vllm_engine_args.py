"""What ``VLLMEngine`` hands to ``vllm.LLM`` and asks of it (a recording stand-in, so no engine starts):
``rollout.gpu_memory_utilization`` from the config through the trainer's engine factory, the per-rank set-up
on several ranks, and the order of sleep-mode calls around a weight sync."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, ClassVar

import pytest
import torch

from spear_engine.config_loading import load_config
from spear_engine.rollout import vllm as vllm_module
from spear_engine.rollout import vllm_world
from spear_engine.train.build import engine_factory

RANK_ZERO = SimpleNamespace(rank=0, world_size=1)  # the engine factory reads only the backend's rank


class RecordingLLM:
    """Stands in for ``vllm.LLM``: records its keyword arguments, the torch.distributed (c10d) state it was
    built under, and the sleep-mode / weight-sync calls made on it."""

    calls: ClassVar[list[dict[str, Any]]] = []

    def __init__(self, **kwargs: Any) -> None:
        RecordingLLM.calls.append(kwargs)
        self.llm_engine = SimpleNamespace(engine_core=SimpleNamespace())
        self.c10d_state = torch.distributed.distributed_c10d._world
        self.log: list[tuple[Any, ...]] = []

    def sleep(self, level: int = 1) -> None:
        self.log.append(("sleep", level))

    def wake_up(self, tags: list[str] | None = None) -> None:
        self.log.append(("wake_up", tags))

    def collective_rpc(self, method: Any, args: tuple[Any, ...] = ()) -> list[Any]:
        self.log.append(("rpc", method.__name__))
        return [None]

    def reset_prefix_cache(self) -> None:
        self.log.append(("reset_prefix_cache",))


@pytest.fixture
def recording_vllm(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    RecordingLLM.calls = []
    monkeypatch.setattr(vllm_module, "import_vllm", lambda: SimpleNamespace(LLM=RecordingLLM))
    return RecordingLLM.calls


def test_gpu_memory_utilization_reaches_the_llm_constructor(recording_vllm, tiny_path: str) -> None:
    vllm_module.VLLMEngine(tiny_path, gpu_memory_utilization=0.37)
    assert recording_vllm[-1]["gpu_memory_utilization"] == 0.37
    vllm_module.VLLMEngine(tiny_path)  # not given: vLLM's own default
    assert "gpu_memory_utilization" not in recording_vllm[-1]


def test_the_trainer_builds_vllm_with_the_configured_share(
    recording_vllm, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = load_config("spear-official", ["model.path=tiny", "rollout.gpu_memory_utilization=0.42"])
    factory, shares = engine_factory(config, "vllm", RANK_ZERO, torch.device("cpu"))  # no model, backend or env
    factory()
    assert not shares and recording_vllm[-1]["gpu_memory_utilization"] == 0.42
    assert load_config("spear-official").rollout.gpu_memory_utilization == 0.6  # the official script's value


def test_the_trainer_passes_the_configured_kv_cache_size(recording_vllm) -> None:
    for given, expected in (("2.5", int(2.5 * 2**30)), ("null", 2**30)):  # null: the 1 GiB CPU default
        config = load_config("spear", ["model.path=tiny", f"rollout.kv_cache_gb={given}"])
        engine_factory(config, "vllm", RANK_ZERO, torch.device("cpu"))[0]()
        assert recording_vllm[-1]["kv_cache_memory_bytes"] == expected


def test_several_ranks_get_a_rank_local_engine_in_vllms_own_world(
    recording_vllm, monkeypatch: pytest.MonkeyPatch, tiny_path: str
) -> None:
    monkeypatch.setattr(vllm_world, "in_multirank_world", lambda: True)
    monkeypatch.setattr(vllm_world, "rank_local_executor", lambda: "rank-local-executor")
    monkeypatch.setattr(vllm_world, "_vllm_world", None)
    c10d = torch.distributed.distributed_c10d
    trainer_state = c10d._world
    engine = vllm_module.VLLMEngine(tiny_path)
    assert recording_vllm[-1]["distributed_executor_backend"] == "rank-local-executor"
    world = vllm_world._vllm_world
    assert engine.llm.c10d_state is world.state is not trainer_state  # vLLM was built in its own world
    assert c10d._world is trainer_state  # and the trainer's is back

    produced_in = []

    def weights():  # a weight stream: its ZeRO-3 gathers must run in the trainer's world
        for i in range(3):
            produced_in.append(c10d._world)
            yield i

    with world.active():
        assert list(world.feed(weights())) == [0, 1, 2] and c10d._world is world.state
    assert produced_in == [trainer_state] * 3 and c10d._world is trainer_state
    with pytest.raises(ValueError, match="tensor_parallel_size=1"):
        vllm_module.VLLMEngine(tiny_path, tensor_parallel_size=2)


def test_sleep_mode_calls_around_a_weight_sync(recording_vllm, tiny_path: str) -> None:
    cpu_engine = vllm_module.VLLMEngine(tiny_path)  # CPU: no sleep mode, both calls are no-ops
    cpu_engine.sleep()
    cpu_engine.wake_up()
    assert cpu_engine.llm.log == [] and not cpu_engine.is_sleeping

    engine = vllm_module.VLLMEngine(tiny_path, enable_sleep_mode=True)  # as on GPU
    assert recording_vllm[-1]["enable_sleep_mode"] is True
    engine.sleep()
    engine.sleep()  # already asleep: nothing more
    assert engine.is_sleeping
    engine.load_weights([])  # weights back first, the KV cache only after the reload
    assert engine.llm.log == [("sleep", 1), ("wake_up", ["weights"]), ("rpc", "_worker_reload"),
                              ("wake_up", ["kv_cache"]), ("reset_prefix_cache",)]  # fmt: skip
    assert not engine.is_sleeping

    engine.llm.log.clear()
    engine.sleep(level=2)  # weights discarded: generating before a reload would sample garbage
    with pytest.raises(RuntimeError, match="load_weights before generate"):
        engine.generate([[1, 2]], vllm_module.SamplingParams(max_new_tokens=2))
    engine.wake_up(["kv_cache"])
    engine.wake_up()
    assert engine.llm.log == [("sleep", 2), ("wake_up", ["kv_cache"]), ("wake_up", ["weights"])]
    with pytest.raises(ValueError, match="sleep level"):
        engine.sleep(level=3)


def test_the_trainer_passes_enforce_eager_and_a_compile_on_cpu_keeps_a_working_cache(
    recording_vllm, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("VLLM_USE_AOT_COMPILE", raising=False)
    config = load_config("spear", ["model.path=tiny"])
    assert config.rollout.enforce_eager is None
    engine_factory(config, "vllm", RANK_ZERO, torch.device("cpu"))[0]()
    assert recording_vllm[-1]["enforce_eager"] is True  # null: eager on CPU
    assert "VLLM_USE_AOT_COMPILE" not in vllm_module.os.environ
    config = load_config("spear", ["model.path=tiny", "rollout.enforce_eager=false"])
    engine_factory(config, "vllm", RANK_ZERO, torch.device("cpu"))[0]()
    assert recording_vllm[-1]["enforce_eager"] is False
    assert vllm_module.os.environ["VLLM_USE_AOT_COMPILE"] == "0"  # vLLM 0.32's AOT cache fails to load on CPU
    monkeypatch.setenv("VLLM_USE_AOT_COMPILE", "1")  # the user's own choice is kept
    engine_factory(config, "vllm", RANK_ZERO, torch.device("cpu"))[0]()
    assert vllm_module.os.environ["VLLM_USE_AOT_COMPILE"] == "1"
    monkeypatch.setattr(vllm_module.torch.cuda, "is_available", lambda: True)
    vllm_module.VLLMEngine(config.model.path)  # on GPU, null compiles (CUDA graphs)
    assert recording_vllm[-1]["enforce_eager"] is False
