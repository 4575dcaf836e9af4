"""What ``VLLMEngine`` hands to ``vllm.LLM`` (a recording stand-in for the constructor, so no engine starts):
``rollout.gpu_memory_utilization`` among it, from the config through the trainer's engine factory."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, ClassVar

import pytest

from spear_engine.config_loading import load_config
from spear_engine.rollout import vllm as vllm_module


class RecordingLLM:
    """Stands in for ``vllm.LLM``: records its keyword arguments."""

    calls: ClassVar[list[dict[str, Any]]] = []

    def __init__(self, **kwargs: Any) -> None:
        RecordingLLM.calls.append(kwargs)
        self.llm_engine = SimpleNamespace(engine_core=SimpleNamespace())


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
    from spear_engine.train.trainer import Trainer

    config = load_config("spear-official", ["model.path=tiny", "rollout.gpu_memory_utilization=0.42"])
    trainer = Trainer.__new__(Trainer)  # only the engine factory: no model, backend or env
    trainer.config, trainer.rank = config, 0
    factory, shares = trainer._engine_factory()
    factory()
    assert not shares and recording_vllm[-1]["gpu_memory_utilization"] == 0.42
    assert load_config("spear-official").rollout.gpu_memory_utilization == 0.6  # the official script's value
