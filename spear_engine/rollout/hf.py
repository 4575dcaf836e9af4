"""``HFEngine``: rollouts with transformers ``generate`` (batched, left-padded), vLLM's sampling semantics.

Sampling and reported log-probs follow vLLM (``logprobs_mode="processed_logprobs"``) exactly, so the
two engines are interchangeable:

- the logits are divided by the temperature, then top-k keeps the tokens whose logit is at least the
  k-th largest (ties kept), then top-p drops the least likely tokens for as long as their summed
  probability stays ≤ ``1 - top_p`` (the most likely token always stays);
- the reported log-prob of a sampled token is ``log_softmax`` of those processed logits: the
  probability it was actually drawn with. With ``top_k=-1, top_p=1`` (the SPEAR defaults) that is
  exactly ``log_softmax(logits / T)``, the trainer's number; with truncation it is the renormalised
  truncated distribution (higher by minus the log of the kept mass);
- greedy (``temperature=0``) reports ``log_softmax(logits)`` (temperature 1), as vLLM does.

All of that runs in one logits processor that also draws the tokens (see ``_Sampler``): ``generate``
runs its greedy loop over the processor's one-hot rows and adds no warpers of its own, and the model's
``generation_config`` is set aside during the call, so a checkpoint's defaults (top_k=20,
repetition_penalty...) never change the distribution behind the engine's back.

Two ways to hold the model:

- **shared** (``HFEngine(model)``): generation runs on the training module itself (switched to eval
  mode for the call and back). ``load_weights`` is then a no-op for tensors that already are the
  module's parameters. Cheapest; not for ZeRO-3-partitioned modules.
- **own copy** (``HFEngine(model, share=False)`` or ``HFEngine.from_pretrained(path)``): a separate
  module; ``load_weights`` copies the trainer's tensors into it (needed for ZeRO-3 and for a rollout
  dtype different from the training one).

Seeds: with ``SamplingParams.seed = s``, row ``i`` of the call draws from a generator seeded ``s + i``
(vLLM's engine does the same per request), so the same prompts and seed give the same samples, and
the global RNG is untouched; ``seed=None`` draws one base seed from torch's global RNG. HF and vLLM
use different noise, so only greedy output is comparable across engines. Sampled continuations of a
row do not depend on the other rows of the batch except through float rounding of the batched forward.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from spear_engine.rollout.engine import Generation, SamplingParams


def apply_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask (to -inf) the logits outside top-k, then outside top-p, as vLLM's sampler does."""
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= 1.0 - top_p
        drop[..., -1] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = logits.scatter(-1, order, sorted_logits)
    return logits


class _Sampler:
    """Logits processor that *is* the sampler: vLLM-style temperature/top-k/top-p, one token per row
    drawn by inverting the float64 CDF at one uniform (an exact sample of ``p``; zero-probability
    tokens are never picked), its log-prob recorded, and a one-hot score row returned so that
    ``generate``'s greedy argmax takes that token.

    Why not ``do_sample=True``: ``torch.multinomial`` costs ~140 ms per step for 64 rows x 49k vocab on
    2 cores (the exponential race ``argmax(p / Exp(1))`` ~80 ms), against ~10 ms for a cumsum and a
    search, and it draws from the global RNG. Here row ``i`` of a call draws from its own generator
    seeded ``seed + i``, as vLLM's per-request seeds do.
    """

    def __init__(self, params: SamplingParams, row_seeds: list[int] | None) -> None:
        self.params = params
        self.generators = None
        if not params.greedy and row_seeds is not None:
            self.generators = [torch.Generator().manual_seed(seed) for seed in row_seeds]
        self.logprobs: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        logits = scores.float()
        if self.params.greedy:
            tokens = logits.argmax(dim=-1, keepdim=True)
        else:
            logits = apply_top_k_top_p(logits / self.params.temperature, self.params.top_k, self.params.top_p)
            if self.generators is None:
                uniform = torch.rand(logits.shape[0], dtype=torch.float64)
            else:
                uniform = torch.cat([torch.rand(1, dtype=torch.float64, generator=g) for g in self.generators])
            cdf = logits.softmax(dim=-1).double().cumsum(dim=-1)
            target = (uniform.to(cdf.device) * cdf[:, -1]).unsqueeze(1)
            tokens = torch.searchsorted(cdf, target, right=True).clamp_(max=logits.shape[-1] - 1)
        self.logprobs.append(torch.log_softmax(logits, dim=-1).gather(1, tokens).squeeze(1))
        return torch.full_like(scores, float("-inf")).scatter_(1, tokens, 0.0)

    def result(self, new_tokens: int, batch: int) -> torch.Tensor:
        """``[batch, new_tokens]`` log-probs of the chosen tokens."""
        if not self.logprobs:
            return torch.zeros((batch, 0))
        return torch.stack(self.logprobs[:new_tokens], dim=1)


def _as_ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def default_eos_ids(model: nn.Module) -> list[int]:
    """The model's eos ids (generation config first, then model config)."""
    generation_config = getattr(model, "generation_config", None)
    ids = _as_ids(getattr(generation_config, "eos_token_id", None))
    return ids or _as_ids(getattr(model.config, "eos_token_id", None))


def trim_at_stop(token_ids: list[int], logprobs: list[float], stop_ids: set[int]) -> Generation:
    """Cut a continuation after its first stop token (kept); ``finish_reason`` says why it ended."""
    for i, token in enumerate(token_ids):
        if token in stop_ids:
            return Generation(token_ids[: i + 1], logprobs[: i + 1], "stop")
    return Generation(token_ids, logprobs, "length")


class HFEngine:
    """Rollouts with ``model.generate``; see the module docstring for sampling and sharing semantics."""

    name = "hf"

    def __init__(self, model: nn.Module, *, share: bool = True, eos_token_ids: Iterable[int] | None = None,
                 pad_token_id: int | None = None, max_batch_size: int | None = None) -> None:
        self.model = model if share else copy.deepcopy(model)
        self.share = share
        self.eos_token_ids = list(eos_token_ids) if eos_token_ids is not None else default_eos_ids(self.model)
        pad = pad_token_id if pad_token_id is not None else getattr(self.model.config, "pad_token_id", None)
        self.pad_token_id = int(pad) if pad is not None else (self.eos_token_ids or [0])[0]
        self.max_batch_size = max_batch_size

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike[str], dtype: str | torch.dtype = "float32",
                        device: str | torch.device = "cpu", **kwargs: Any) -> HFEngine:
        """An engine with its own copy of a model (any name :func:`spear_engine.models.load_model` takes)."""
        from spear_engine.models import load_model

        model, _ = load_model(name_or_path, dtype=dtype, device=device)
        return cls(model, share=True, **kwargs)

    # -----------------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Generation]:
        if not prompts:
            return []
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        base_seed = params.seed
        if base_seed is None and not params.greedy:
            base_seed = int(torch.randint(0, 2**62, (1,)).item())  # from the global RNG
        size = self.max_batch_size or len(prompts)
        out: list[Generation] = []
        for start in range(0, len(prompts), size):
            chunk = prompts[start:start + size]
            seeds = None if base_seed is None else [base_seed + start + i for i in range(len(chunk))]
            out.extend(self._generate_batch(chunk, params, seeds))
        return out

    def _generate_batch(self, prompts: list[list[int]], params: SamplingParams,
                        row_seeds: list[int] | None) -> list[Generation]:
        from transformers import GenerationConfig

        model = self.model
        device = next(model.parameters()).device
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            input_ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            attention_mask[row, width - len(prompt):] = 1
        stop_ids = sorted(set(params.stop_token_ids) | set(self.eos_token_ids))
        # The sampler processor picks every token; generate only runs the loop (greedy over one-hot rows).
        config = GenerationConfig(
            max_new_tokens=params.max_new_tokens, do_sample=False, min_length=0, repetition_penalty=1.0,
            num_beams=1, eos_token_id=stop_ids or None, pad_token_id=self.pad_token_id, use_cache=True,
            return_dict_in_generate=False)
        sampler = _Sampler(params, row_seeds)
        was_training = model.training
        saved_config = getattr(model, "generation_config", None)
        model.generation_config = GenerationConfig()  # no checkpoint defaults leak into the call
        model.eval()
        try:
            with torch.inference_mode():
                sequences = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                           generation_config=config, logits_processor=[sampler])
            new_tokens = sequences[:, width:].cpu()
            logprobs = sampler.result(new_tokens.shape[1], len(prompts)).cpu()
        finally:
            model.generation_config = saved_config
            model.train(was_training)
        stop_set = set(stop_ids)
        return [trim_at_stop(t, lp, stop_set) for t, lp in zip(new_tokens.tolist(), logprobs.tolist())]

    # -----------------------------------------------------------------------------------------
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy tensors (HF names; tied aliases accepted) into the engine's model; a tensor that already
        is the parameter (shared mode) is skipped. Unknown names raise ``KeyError``."""
        params = dict(self.model.named_parameters(remove_duplicate=False))
        with torch.no_grad():
            for name, tensor in named_tensors:
                param = params.get(name)
                if param is None:
                    raise KeyError(f"HFEngine.load_weights: the rollout model has no parameter {name!r}")
                if param.shape != tensor.shape:
                    raise ValueError(f"HFEngine.load_weights: {name} has shape {tuple(tensor.shape)}, "
                                     f"the rollout model's is {tuple(param.shape)}")
                if param.data_ptr() == tensor.data_ptr() and param.dtype == tensor.dtype:
                    continue
                param.copy_(tensor)

    def close(self) -> None:
        """Drop the reference to the model (an own copy is then freed)."""
        self.model = None  # type: ignore[assignment]
