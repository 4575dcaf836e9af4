"""The policy forward for training: transformer → last hidden states → fused log-prob + entropy.

The vocabulary-sized logits are never materialised: the hidden states of the positions that predict
response tokens go straight into ``spear_kernels.linear_logprob_entropy`` with the lm_head weight (the
logits exist only chunk by chunk, on CPU and GPU alike).

:class:`FusedHeadPolicy` wraps a Hugging Face causal LM. It is the module a backend trains (plain torch
or DeepSpeed); under ZeRO-3 the lm_head weight is registered as an external parameter of the wrapper,
so DeepSpeed gathers it for the wrapper's forward although ``lm_head.forward`` never runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import spear_kernels


@dataclass
class SequenceBatch:
    """Rows as the model sees them: ``[prompt | response]`` ids with the response region at the end.

    ``input_ids``/``attention_mask`` are [N, P + L] (prompt left-padded, response right-padded); the
    logits at position ``P - 1 + j`` predict ``responses[:, j]``.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prompt_width: int

    @property
    def responses(self) -> torch.Tensor:
        return self.input_ids[:, self.prompt_width :]

    @property
    def response_attention(self) -> torch.Tensor:
        return self.attention_mask[:, self.prompt_width :]

    def select(self, idx: torch.Tensor) -> SequenceBatch:
        return SequenceBatch(self.input_ids[idx], self.attention_mask[idx], self.prompt_width)

    @classmethod
    def from_prompt_response(
        cls, prompts: torch.Tensor, prompt_mask: torch.Tensor, responses: torch.Tensor, response_mask: torch.Tensor
    ) -> SequenceBatch:
        return cls(torch.cat([prompts, responses], 1), torch.cat([prompt_mask, response_mask], 1), prompts.shape[1])

    @classmethod
    def from_flagged_rows(
        cls, tokens: torch.Tensor, flags: torch.Tensor, lengths: torch.Tensor, pad_id: int
    ) -> tuple[SequenceBatch, list[int]]:
        """Right-padded stored rows (replay) → the same layout. The prompt is everything before a row's
        first flagged (sampled) token, the response region the rest of the row. Also returns each row's
        first flagged position, for :func:`response_aligned`."""
        n = tokens.shape[0]
        firsts = []
        for i in range(n):
            hits = torch.nonzero(flags[i, : int(lengths[i])])
            firsts.append(int(hits[0]) if len(hits) else int(lengths[i]))
        p = max(max(firsts, default=1), 1)
        r = max(max((int(lengths[i]) - firsts[i] for i in range(n)), default=1), 1)
        ids = torch.full((n, p + r), pad_id, dtype=torch.long)
        mask = torch.zeros((n, p + r), dtype=torch.long)
        for i, first in enumerate(firsts):
            length = int(lengths[i])
            ids[i, p - first : p] = tokens[i, :first]
            ids[i, p : p + length - first] = tokens[i, first:length]
            mask[i, p - first : p + length - first] = 1
        return cls(ids, mask, p), firsts


def response_aligned(values: torch.Tensor, firsts: list[int], lengths: torch.Tensor, width: int) -> torch.Tensor:
    """Per-token values of stored rows ([k, Lmax]) moved to the response region of ``from_flagged_rows``."""
    out = torch.zeros((values.shape[0], width), dtype=values.dtype)
    for i, first in enumerate(firsts):
        n = int(lengths[i]) - first
        out[i, :n] = values[i, first : first + n]
    return out


class FusedHeadPolicy(torch.nn.Module):
    """A causal LM whose training forward returns (logp, entropy) of the response tokens, fused."""

    def __init__(self, model: torch.nn.Module, temperature: float = 1.0, chunk_size: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.temperature = temperature
        self.chunk_size = chunk_size

    @property
    def lm_head(self) -> torch.nn.Module:
        return self.model.get_output_embeddings()

    def forward(self, batch: SequenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """[N, L] fp32 log-probs and entropies of ``batch.responses`` (0 where the response is padding)."""
        mask = batch.attention_mask
        position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
        hidden = self.model.base_model(
            input_ids=batch.input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        p = batch.prompt_width
        width = batch.input_ids.shape[1] - p
        predicting = hidden[:, p - 1 : p - 1 + width]
        valid = batch.response_attention.bool()
        logp = torch.zeros(valid.shape, dtype=torch.float32, device=hidden.device)
        entropy = torch.zeros(valid.shape, dtype=torch.float32, device=hidden.device)
        if not valid.any():
            return logp + 0.0 * hidden.sum(), entropy
        rows = predicting[valid]
        head = self.lm_head
        lp, ent = spear_kernels.linear_logprob_entropy(
            rows, head.weight, batch.responses[valid], bias=getattr(head, "bias", None),
            temperature=self.temperature, chunk_size=self.chunk_size,
        )  # fmt: skip
        logp = logp.masked_scatter(valid, lp)
        entropy = entropy.masked_scatter(valid, ent)
        return logp, entropy
