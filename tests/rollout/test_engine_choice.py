"""``rollout.name=auto`` (vLLM where it imports, else HF) and ``trainer.device`` resolution."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import spear_engine.rollout.vllm as vllm_module
from spear_engine.rollout.engine import AUTO_ENGINE_ENV, resolve_engine_name
from spear_engine.train.backends import resolve_device


def test_named_engines_are_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(AUTO_ENGINE_ENV, "vllm")
    assert resolve_engine_name("hf") == "hf" and resolve_engine_name("vllm") == "vllm"


@pytest.mark.parametrize("forced", ["hf", "vllm", " VLLM "])
def test_auto_follows_the_environment_variable(monkeypatch: pytest.MonkeyPatch, forced: str) -> None:
    monkeypatch.setenv(AUTO_ENGINE_ENV, forced)
    assert resolve_engine_name("auto") == forced.strip().lower()


def test_a_bad_environment_variable_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(AUTO_ENGINE_ENV, "sglang")
    with pytest.raises(ValueError, match="expected hf or vllm"):
        resolve_engine_name("auto")


def test_auto_is_hf_without_vllm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(AUTO_ENGINE_ENV, raising=False)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real_find_spec(name, *a))
    assert resolve_engine_name("auto") == "hf"


def test_auto_is_hf_when_vllm_is_broken(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(AUTO_ENGINE_ENV, raising=False)
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed: the broken-install branch needs its import to be attempted")

    def broken() -> None:
        raise vllm_module.VLLMNotAvailableError("CUDA torchvision on a CPU machine")

    monkeypatch.setattr(vllm_module, "import_vllm", broken)
    assert resolve_engine_name("auto") == "hf"


def test_auto_is_vllm_where_it_imports(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(AUTO_ENGINE_ENV, raising=False)
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed here")
    assert resolve_engine_name("auto") == "vllm"


def test_device_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="no CUDA device"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert resolve_device("auto") == torch.device("cuda", 3)
