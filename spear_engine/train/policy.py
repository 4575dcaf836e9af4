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
from typing import Any

import torch

import spear_kernels
from spear_engine.train.packed_attention import PACKED_MASK, pack_rows, use_packed_attention


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

    def to(self, device: torch.device | str) -> SequenceBatch:
        return SequenceBatch(self.input_ids.to(device), self.attention_mask.to(device), self.prompt_width)

    @property
    def row_tokens(self) -> torch.Tensor:
        """Real tokens per row (what a packed forward processes)."""
        return self.attention_mask.sum(1)

    @classmethod
    def from_prompt_response(
        cls,
        prompts: torch.Tensor,
        prompt_mask: torch.Tensor,
        responses: torch.Tensor,
        response_mask: torch.Tensor,
    ) -> SequenceBatch:
        return cls(
            torch.cat([prompts, responses], 1), torch.cat([prompt_mask, response_mask], 1), prompts.shape[1]
        )

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


def response_aligned(
    values: torch.Tensor, firsts: list[int], lengths: torch.Tensor, width: int
) -> torch.Tensor:
    """Per-token values of stored rows ([k, Lmax]) moved to the response region of ``from_flagged_rows``."""
    out = torch.zeros((values.shape[0], width), dtype=values.dtype)
    for i, first in enumerate(firsts):
        n = int(lengths[i]) - first
        out[i, :n] = values[i, first : first + n]
    return out


class FusedHeadPolicy(torch.nn.Module):
    """A causal LM whose training forward returns (logp, entropy) of the response tokens, fused.

    ``packed=True`` (``actor.use_remove_padding``) runs the transformer on the real tokens of the rows
    only, concatenated into one sequence (:mod:`spear_engine.train.packed_attention`); ``False`` runs the
    padded ``[N, W]`` rows, the oracle the packed forward is tested against. Both return the same
    ``[N, L]`` response-aligned tensors. ``share_prefixes`` (``actor.share_prefixes``, packed only): a
    prefix several rows share runs once (:func:`~spear_engine.train.prefix_tree.pack_prefix_tree`).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        temperature: float = 1.0,
        chunk_size: int | None = None,
        packed: bool = False,
        share_prefixes: bool = False,
    ) -> None:
        super().__init__()
        self.model = model
        self.temperature = temperature
        self.chunk_size = chunk_size
        self.packed = packed
        self.share_prefixes = share_prefixes
        if packed:
            use_packed_attention(model)

    @property
    def lm_head(self) -> torch.nn.Module:
        return self.model.get_output_embeddings()

    def predicting_hidden(self, batch: SequenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden states of the positions that predict the valid response tokens [n, H], valid [N, L])."""
        p = batch.prompt_width
        width = batch.input_ids.shape[1] - p
        valid = batch.response_attention.bool()
        if self.packed:
            packed = pack_rows(batch.input_ids, batch.attention_mask, self.share_prefixes)
            hidden = self.model.base_model(
                input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                attention_mask=PACKED_MASK.to(batch.input_ids.device), use_cache=False,
                cu_seq_lens_q=packed["cu_seqlens"], cu_seq_lens_k=packed["cu_seqlens_k"],
                max_length_q=packed["max_length"], max_length_k=packed["max_length_k"],
                packed_key_index=packed["key_index"],
            ).last_hidden_state[0]  # fmt: skip
            source = packed["index"][:, p - 1 : p - 1 + width]
            valid = valid & (source >= 0)  # a response token with no real token before it predicts nothing
            return hidden[source[valid]], valid
        mask = batch.attention_mask
        position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
        hidden = self.model.base_model(
            input_ids=batch.input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        return hidden[:, p - 1 : p - 1 + width][valid], valid

    def _head(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(hidden rows, lm_head weight, bias) in one dtype: under autocast the autocast dtype (bf16 products,
        the weight's gradient flows back to its fp32 master copy through the cast)."""
        device_type = rows.device.type
        if torch.is_autocast_enabled(device_type):
            rows = rows.to(torch.get_autocast_dtype(device_type))
        head = self.lm_head
        weight = head.weight if head.weight.dtype == rows.dtype else head.weight.to(rows.dtype)
        bias = getattr(head, "bias", None)
        return rows, weight, None if bias is None else bias.to(rows.dtype)

    def forward(
        self, batch: SequenceBatch, loss: TokenLoss | None = None
    ) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, Any]:
        """[N, L] fp32 log-probs and entropies of ``batch.responses`` (0 where the response is padding).

        With ``loss`` (:class:`TokenLoss`), the policy loss too, fused with the head: hidden -> log-prob,
        entropy, loss and the head's gradients in one pass (``spear_kernels.fused_linear_policy_loss``);
        returns ``(log_probs, entropy, PolicyLossOutput)``."""
        rows, valid = self.predicting_hidden(batch)
        logp = torch.zeros(valid.shape, dtype=torch.float32, device=rows.device)
        entropy = torch.zeros(valid.shape, dtype=torch.float32, device=rows.device)
        if not valid.any():
            if loss is not None:
                raise ValueError("a fused loss needs at least one response token in the micro-batch")
            return logp + 0.0 * rows.sum(), entropy
        x, weight, bias = self._head(rows)
        labels = batch.responses[valid]
        with torch.autocast(rows.device.type, enabled=False):  # the kernels pick their own precisions
            if loss is None:
                lp, ent = spear_kernels.linear_logprob_entropy(
                    x, weight, labels, bias=bias, temperature=self.temperature, chunk_size=self.chunk_size
                )
                return logp.masked_scatter(valid, lp.float()), entropy.masked_scatter(valid, ent.float())
            out = loss.apply(x, weight, bias, labels, valid, self.temperature, self.chunk_size)
        logp = logp.masked_scatter(valid, out.logp.reshape(-1).float())
        entropy = entropy.masked_scatter(valid, out.entropy.reshape(-1).float())
        return logp, entropy, out


@dataclass
class TokenLoss:
    """The policy loss of a micro-batch for a fused forward: per-token tensors [N, L] aligned with the rows'
    responses, the loss mode and its constants (``kernel_loss_constants``). ``token_weights`` carry the
    aggregation (``spear_kernels.agg_scale``: verl's ``agg_loss`` with the batch info as per-token factors)
    times any IS weights, so the kernel sums; ``entropy_weights`` the aggregation alone.
    ``old_log_prob=None``: exactly on-policy."""

    old_log_prob: torch.Tensor | None
    advantages: torch.Tensor
    loss_mask: torch.Tensor
    token_weights: torch.Tensor
    entropy_weights: torch.Tensor
    loss_mode: str
    constants: dict[str, float]
    entropy_coeff: float

    def apply(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
              valid: torch.Tensor, temperature: float, chunk_size: int | None) -> Any:  # fmt: skip
        """``fused_linear_policy_loss`` over the valid tokens, as one row ``[1, n]``."""

        def pick(t: torch.Tensor) -> torch.Tensor:
            return t.to(x.device)[valid][None]

        return spear_kernels.fused_linear_policy_loss(
            x[None], weight, labels[None], None if self.old_log_prob is None else pick(self.old_log_prob),
            pick(self.advantages), pick(self.loss_mask), bias=bias, temperature=temperature,
            loss_mode=self.loss_mode, loss_agg_mode="token-sum", weights=pick(self.token_weights),
            entropy_coeff=self.entropy_coeff, entropy_weights=pick(self.entropy_weights), chunk_size=chunk_size,
            **self.constants,
        )  # fmt: skip
