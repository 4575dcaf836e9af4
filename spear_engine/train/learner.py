"""The trainer's side of a step (:class:`spear_engine.step.Learner`) for a causal LM: rows become packed or
padded sequences, log-probs come from the fused head (never the vocabulary-sized logits), the update runs
on the backend (torch or ZeRO-3) under bf16 autocast when configured, and a rollout engine with its own
weights sleeps during the update."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from spear_engine.algorithms.self_imitation import MASK_ATTENTION, ReplayBatch, SILBatch
from spear_engine.config import SpearConfig
from spear_engine.data import RolloutBatch
from spear_engine.rollout.engine import RolloutEngine
from spear_engine.train import collectives
from spear_engine.train.backends import Backend
from spear_engine.train.perf import TokenMeter
from spear_engine.train.policy import FusedHeadPolicy, SequenceBatch, TokenLoss, response_aligned
from spear_engine.train.precision import autocast_bf16
from spear_engine.train.prefix_tree import distinct_tokens, real_rows
from spear_engine.train.update import LossRows, micro_batches


class PolicyLearner:
    """:class:`spear_engine.step.Learner` over a :class:`FusedHeadPolicy` trained by a :class:`Backend`."""

    def __init__(
        self,
        config: SpearConfig,
        policy: FusedHeadPolicy,
        ref_policy: FusedHeadPolicy | None,
        backend: Backend,
        engine: RolloutEngine,
        engine_shares_weights: bool,
        device: torch.device,
        pad_token_id: int,
        token_meter: TokenMeter,
        baseline_of: Any = None,
    ) -> None:
        self.config = config
        self.policy = policy
        self.ref_policy = ref_policy
        self.backend = backend
        self.engine = engine
        self.engine_shares_weights = engine_shares_weights
        self.device = device
        self.pad_token_id = pad_token_id
        self.token_meter = token_meter
        self.baseline_of = baseline_of
        """``rows -> (values, stds)`` of this rank's replay policy, for the cross-rank baseline (or None)."""
        self.rank, self.world_size = backend.rank, backend.world_size
        self.fused_loss = config.actor.fused_loss
        fp32_weights = next(policy.parameters()).dtype == torch.float32
        self.bf16_autocast = fp32_weights and autocast_bf16(config.actor.autocast, device)
        """Whether the passes run under bf16 autocast (``actor.autocast``; ``auto``: where bf16 is native). Never
        over weights that are already bf16 (``model.dtype``): there autocast would only add casts."""

    def inputs(self, batch: RolloutBatch) -> SequenceBatch:
        return SequenceBatch.from_prompt_response(batch.prompts, batch.prompt_mask, batch.responses,
                                                  batch.response_attention_mask)  # fmt: skip

    def loss_rows(self, inputs: SequenceBatch, **tensors: torch.Tensor | None) -> LossRows:
        return LossRows(inputs, tokens=inputs.row_tokens, row_ids=self._row_ids(self.policy, inputs),
                        **tensors).to(self.device)  # type: ignore[arg-type]  # fmt: skip

    @staticmethod
    def _row_ids(policy: FusedHeadPolicy | None, inputs: SequenceBatch) -> list[list[int]] | None:
        """Each row's tokens when ``policy`` runs shared prefixes once (to group such rows), else None."""
        if policy is None or not policy.share_prefixes:
            return None
        return real_rows(inputs.input_ids, inputs.attention_mask)

    def _meter(self, policy: FusedHeadPolicy, rows: SequenceBatch, kind: str, ids: list[list[int]] | None) -> None:
        """Count one forward of ``rows`` (``ids``: their tokens when ``policy`` shares prefixes, else None)."""
        self.token_meter.add(rows.attention_mask, int(rows.response_attention.sum()), kind, policy.packed,
                             None if ids is None else distinct_tokens(ids))  # fmt: skip

    @staticmethod
    def _picked(row_ids: list[list[int]] | None, idx: np.ndarray) -> list[list[int]] | None:
        return None if row_ids is None else [row_ids[i] for i in idx.tolist()]

    def token_stats(self, inputs: SequenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
        return self._token_stats(self.policy, inputs)

    def ref_log_prob(self, inputs: SequenceBatch) -> torch.Tensor | None:
        return self._token_stats(self.ref_policy, inputs)[0] if self.ref_policy is not None else None

    def forward(self, idx: np.ndarray, rows: LossRows, loss: TokenLoss | None = None) -> tuple[Any, ...]:
        """The training forward of rows ``idx`` (with ``loss``: the fused loss too, see ``FusedHeadPolicy``)."""
        selected = rows.inputs.select(torch.as_tensor(idx))
        self._meter(self.policy, selected, "train", self._picked(rows.row_ids, idx))
        with self.autocast():
            if loss is None:
                return self.backend.forward(selected.to(self.device))
            return self.backend.forward(selected.to(self.device), loss)

    def replay_rows(self, replay: ReplayBatch) -> LossRows:
        tokens = torch.as_tensor(replay.tokens, dtype=torch.long)
        flags = torch.as_tensor(replay.mask)
        lengths = torch.as_tensor(replay.lengths)
        sequences, firsts = SequenceBatch.from_flagged_rows(tokens, (flags & MASK_ATTENTION) > 0, lengths,
                                                            self.pad_token_id)  # fmt: skip
        width = sequences.input_ids.shape[1] - sequences.prompt_width

        def aligned(values: Any) -> torch.Tensor:
            return response_aligned(torch.as_tensor(values), firsts, lengths, width)

        return LossRows(sequences, aligned(replay.logp), aligned(replay.token_advantages()),
                        aligned(replay.loss_mask()), tokens=sequences.row_tokens,
                        row_ids=self._row_ids(self.policy, sequences)).to(self.device)  # fmt: skip

    def old_log_probs_from_update(self, rows: int) -> bool:
        """Whether the update is exactly on-policy, so its own first forward gives the old log-probs: one
        epoch, one mini-batch on every rank (all ranks decide alike), and nothing that needs the old
        log-probs before the update (rollout IS weights, KL in the reward)."""
        cfg, a = self.config, self.config.actor
        if (a.recompute_old_log_prob == "always" or a.ppo_epochs != 1 or cfg.rollout.rollout_is != "none"
                or cfg.algorithm.use_kl_in_reward):  # fmt: skip
            return False
        return collectives.max_over_ranks(float(rows), self.world_size) <= a.ppo_mini_batch_size

    @contextmanager
    def updating(self) -> Iterator[None]:
        """A rollout engine with its own weights frees its accelerator memory during the update (vLLM's sleep
        mode on GPU; a no-op on CPU and for engines without it); the weight sync wakes it."""
        sleep = getattr(self.engine, "sleep", None) if not self.engine_shares_weights else None
        if sleep is not None:
            sleep()
        yield

    def gathered_baseline(self, rows: SILBatch) -> tuple[np.ndarray, np.ndarray] | None:
        if self.world_size == 1 or self.baseline_of is None:
            return None
        everyone = collectives.gather_objects(self.baseline_of(rows), self.world_size)
        return np.concatenate([v for v, _ in everyone]), np.concatenate([s for _, s in everyone])

    def autocast(self) -> Any:
        """bf16 mixed precision of the trainer's passes (``actor.autocast``); weights stay in their dtype."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16_autocast)

    @torch.no_grad()
    def _token_stats(
        self, policy: FusedHeadPolicy | None, sequences: SequenceBatch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probs and entropies under ``policy`` (no gradient), micro-batch by micro-batch, on the CPU."""
        assert policy is not None
        shape = sequences.responses.shape
        log_probs, entropy = torch.zeros(shape, dtype=torch.float32), torch.zeros(shape, dtype=torch.float32)
        everything = np.arange(shape[0])
        row_ids = self._row_ids(policy, sequences)
        for idx in micro_batches(sequences.row_tokens, everything, self.config.actor, row_ids):  # as the update's
            where = torch.as_tensor(idx)
            rows = sequences.select(where)
            self._meter(policy, rows, "forward", self._picked(row_ids, idx))
            with self.autocast():
                out = self.backend.forward(rows.to(self.device)) if policy is self.policy else policy(rows.to(self.device))
            log_probs[where], entropy[where] = out[0].float().cpu(), out[1].float().cpu()
        return log_probs, entropy
