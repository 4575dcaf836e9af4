"""Per-token log-probs and entropies of any Hugging Face causal LM, without vocabulary-sized logits.

Why: ``model(input_ids).logits`` is [B, T, V]; at V = 151k and 8k tokens that is 2.5 GB in bf16 and
twice that again once a trainer upcasts it to fp32 for ``log_softmax`` and the entropy. RL trainers only
need, per position, the log-prob of the next token and the entropy of the distribution. Here the model's
backbone (``model.base_model``: the transformer without its head) gives the last hidden states, and
:func:`~spear_kernels.linear_logprob_entropy` applies the lm_head weight chunk by chunk: the logits
exist one chunk of tokens at a time, forward and backward.

No import of ``transformers``: any model with ``get_output_embeddings()`` (a linear head, bias allowed)
and a ``base_model`` (or ``get_decoder()``) that returns ``last_hidden_state`` works — what every
``*ForCausalLM`` of transformers offers. PEFT models are unwrapped with ``get_base_model()``.
"""

from __future__ import annotations

from typing import Any

import torch

from .linear_logprob_entropy import linear_logprob_entropy
from .modules import head_operands, no_autocast
from .utils import Backend


def causal_lm_parts(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(backbone, lm_head) of a causal LM: the module that returns the last hidden states, and the head."""
    if hasattr(model, "get_base_model"):  # PEFT: the wrapped transformers model (LoRA layers injected)
        model = model.get_base_model()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise TypeError(f"{type(model).__name__} has no linear output head (get_output_embeddings())")
    backbone = getattr(model, "base_model", None)
    if backbone is None or backbone is model:
        backbone = model.get_decoder() if hasattr(model, "get_decoder") else None
    if backbone is None or backbone is model:
        raise TypeError(f"cannot find the backbone of {type(model).__name__} (base_model / get_decoder())")
    return backbone, head


def _logit_scale(model: torch.nn.Module, logit_scale: float | None) -> float:
    """The factor between ``lm_head(h)`` and the model's logits: 1 for most models, Cohere's ``logit_scale``;
    models that post-process their logits in other ways must say how (or are refused)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(inner, "config", None)
    if getattr(config, "final_logit_softcapping", None):
        raise NotImplementedError(
            f"{type(inner).__name__} soft-caps its logits (final_logit_softcapping): the fused head computes "
            "log-probs of the raw lm_head logits and cannot reproduce it"
        )
    if logit_scale is not None:
        return float(logit_scale)
    scale = getattr(inner, "logit_scale", None)
    if isinstance(scale, (int, float)):  # Cohere family: logits = lm_head(h) * logit_scale
        return float(scale)
    if getattr(config, "logits_scaling", None) not in (None, 1, 1.0):
        raise ValueError(
            f"{type(inner).__name__} rescales its logits (config.logits_scaling = {config.logits_scaling}): pass "
            "logit_scale= (logits = logit_scale · lm_head(h); Granite divides by logits_scaling, so 1/logits_scaling)"
        )
    return 1.0


def token_logprobs_entropy(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    temperature: float = 1.0,
    *,
    logits_to_keep: int = 0,
    ignore_index: int = -100,
    logit_scale: float | None = None,
    chunk_size: int | None = None,
    backend: Backend = "auto",
    **model_kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each label under the model, and the entropy of the model's distribution there, from
    ``model``'s backbone and its lm_head weight, never materialising [B, T, V] logits.

    Args:
        model: a causal LM (``*ForCausalLM`` of transformers, or a PEFT wrapper of one). Train or eval mode,
            with or without grad: the result is differentiable w.r.t. every parameter (backbone and head).
        input_ids, attention_mask: [B, T] as for ``model(...)``; ``model_kwargs`` (e.g. ``position_ids``) are
            passed on to the backbone unchanged, so the hidden states are those of ``model(...)``'s forward.
        labels: [B, T] targets aligned with ``input_ids`` as in HF (position t - 1 predicts ``labels[:, t]``);
            default ``input_ids``. ``ignore_index`` labels and positions where a 2-D ``attention_mask`` is 0
            are skipped (log-prob and entropy 0 there, nothing computed).
        temperature: the logits are divided by it (use the sampling temperature of the rollouts).
        logits_to_keep: 0 → outputs [B, T] (column 0 is 0: nothing predicts the first token); k > 0 → only the
            last k labels, outputs [B, k] (TRL's ``logits_to_keep``: the completion tokens).
        logit_scale: logits = logit_scale · lm_head(h) (default: 1, or the model's Cohere-style ``logit_scale``).
        chunk_size, backend: of :func:`~spear_kernels.linear_logprob_entropy`.

    Returns:
        (logp, entropy): float32, [B, T] or [B, k]; ``logp[:, t] = log softmax(z_{t-1} / T)[labels[:, t]]``.
        Memory beyond the backbone's activations: one chunk of logits.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, T], got {tuple(input_ids.shape)}")
    labels = input_ids if labels is None else labels
    if labels.shape != input_ids.shape:
        raise ValueError(f"labels {tuple(labels.shape)} must match input_ids {tuple(input_ids.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    b, t = labels.shape
    k = t - 1 if not logits_to_keep else int(logits_to_keep)
    if not 0 < k < t:
        raise ValueError(f"logits_to_keep must be in [1, {t - 1}] for sequences of {t} tokens, got {logits_to_keep}")
    scale = _logit_scale(model, logit_scale)
    if scale <= 0:
        raise ValueError(f"logit_scale must be > 0, got {scale}")
    backbone, head = causal_lm_parts(model)
    model_kwargs.setdefault("use_cache", False)
    out = backbone(input_ids=input_ids, attention_mask=attention_mask, **model_kwargs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    rows = hidden[:, t - k - 1 : t - 1]  # position j predicts token j + 1
    targets = labels[:, t - k :]
    valid = targets != ignore_index
    if attention_mask is not None and attention_mask.dim() == 2:
        valid = valid & (attention_mask[:, t - k :] != 0)
    logp = torch.zeros((b, k), dtype=torch.float32, device=hidden.device)
    entropy = torch.zeros((b, k), dtype=torch.float32, device=hidden.device)
    if not valid.any():  # keep the graph connected so backward() still runs
        zero = 0.0 * hidden.sum()
        return logp + zero, entropy + zero
    x, w, bias = head_operands(rows[valid], head.weight, getattr(head, "bias", None))
    with no_autocast(x):
        lp, ent = linear_logprob_entropy(
            x, w, targets[valid], bias=bias, temperature=temperature / scale, chunk_size=chunk_size, backend=backend
        )
    logp = logp.masked_scatter(valid, lp)
    entropy = entropy.masked_scatter(valid, ent)
    if not logits_to_keep:  # back to [B, T]: position 0 has no prediction
        pad = torch.zeros((b, 1), dtype=torch.float32, device=hidden.device)
        logp, entropy = torch.cat([pad, logp], 1), torch.cat([pad, entropy], 1)
    return logp, entropy
