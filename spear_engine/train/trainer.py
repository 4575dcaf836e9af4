"""The trainer: the only place that wires the stages (DESIGN.md). ``Trainer.train_step`` reads as the
data-flow picture: rollout → rewards and filters → old log-probs → advantages → self-imitation draw →
actor update (on-policy + c(t)·replay) → weight sync → replay buffer update → metrics (→ checkpoint).

Ranks (DeepSpeed ZeRO-3): each rank rolls out whole prompt groups (groups are never split), keeps its
own replay index, and pushes the baseline statistics of *all* ranks (gathered) so every rank's baseline
is the same; the loss normalisation uses global token / sequence counts, so N ranks reproduce one
process on the same data.
"""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spear_engine.algorithms.losses import agg_loss
from spear_engine.algorithms.rollout_correction import rollout_correction
from spear_engine.algorithms.self_imitation import MASK_ATTENTION, ReplayBatch, SelfImitation
from spear_engine.config import SpearConfig
from spear_engine.config_loading import ConfigError, config_to_yaml
from spear_engine.data import Episode, RolloutBatch
from spear_engine.envs.base import make_env
from spear_engine.metrics import MetricsLogger, StageClock, build_logger, episode_metrics
from spear_engine.pipeline import (
    compute_advantages,
    filter_groups,
    pad_batch,
    schedule_metrics,
    score_and_filter,
    sil_batch,
)
from spear_engine.rollout.agent_loop import AgentLoop, AgentLoopConfig
from spear_engine.rollout.engine import SamplingParams, resolve_engine_name
from spear_engine.rollout.resilient import ResilientEngine
from spear_engine.rollout.weight_sync import iter_named_weights, sync_weights
from spear_engine.train.backends import resolve_device
from spear_engine.train.checkpoint import (
    CheckpointError,
    capture_rng_state,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from spear_engine.train.perf import TokenMeter, flop_params, gemm_flops_per_s
from spear_engine.train.policy import FusedHeadPolicy, SequenceBatch, TokenLoss, response_aligned
from spear_engine.train.update import LossRows, micro_batches, update_actor

SEED_STRIDE = 1_000_003


class TrainingHalted(RuntimeError):
    """Training stopped on purpose (e.g. repeated non-finite steps); the last good state is checkpointed."""


def resolve_run_dir(config: SpearConfig) -> Path:
    name = config.trainer.run_name or f"{config.preset}-{config.env.name}-{datetime.now():%Y%m%d-%H%M%S}"
    return Path(config.trainer.output_dir) / name


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def check_groups_per_rank(config: SpearConfig, world_size: int) -> None:
    """Every rank needs at least one prompt group, and the group-std rollout filter must keep at least one
    of a rank's groups (``int(ratio x groups)``): otherwise a step fails mid-way, so fail at start-up."""
    groups = config.data.train_batch_size // world_size
    ratio = config.rollout.rollout_filter_ratio
    if groups >= 1 and (ratio >= 1 or int(ratio * groups) >= 1):
        return
    need = 1
    while ratio < 1 and int(ratio * need) < 1:
        need += 1
    raise ConfigError(
        f"data.train_batch_size={config.data.train_batch_size} prompt groups over {world_size} rank(s) gives "
        f"{groups} group(s) per rank, and rollout.rollout_filter_ratio={ratio} keeps int({ratio} x {groups}) = "
        f"{int(ratio * groups) if ratio < 1 else groups} of them. Set data.train_batch_size >= {need * world_size} "
        f"(a multiple of {world_size}) or rollout.rollout_filter_ratio=1.0."
    )


class Trainer:
    """Builds the model, backend, rollout engine, agent loop and replay buffer from a config."""

    def __init__(self, config: SpearConfig, run_dir: str | Path | None = None, console: bool = True) -> None:
        from spear_engine.models import load_model

        self.config = config
        tc = config.trainer
        seed_everything(tc.seed)
        if tc.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.device = resolve_device(tc.device)
        model, self.tokenizer = load_model(config.model.path, dtype=config.model.dtype, device=self.device)
        if config.model.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        self.pad_token_id = int(self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None
                                else self.tokenizer.eos_token_id)  # fmt: skip
        self.ref_policy = None
        packed = config.actor.use_remove_padding
        if config.actor.use_kl_loss or config.algorithm.use_kl_in_reward:  # both need reference log-probs
            self.ref_policy = FusedHeadPolicy(copy.deepcopy(model).eval().requires_grad_(False),
                                              config.rollout.temperature, packed=packed)  # fmt: skip
        self.policy = FusedHeadPolicy(model, temperature=config.rollout.temperature, packed=packed)
        first = next(model.parameters())
        self.flop_params = flop_params(model)
        compute_dtype = torch.bfloat16 if config.actor.autocast == "bf16" else first.dtype
        self.gemm_rate = gemm_flops_per_s(compute_dtype, self.device.type)  # once per process and dtype
        self.token_meter = TokenMeter()
        self.backend = self._build_backend()
        self.rank, self.world_size = self.backend.rank, self.backend.world_size
        check_groups_per_rank(config, self.world_size)
        self.engine_name = resolve_engine_name(config.rollout.name)  # auto: vLLM where it imports, else HF
        self.engine, self.engine_shares_weights = self._build_engine()
        env_kwargs = {"max_steps": config.env.max_steps, **config.env.kwargs}
        loop_config = AgentLoopConfig(
            layout=config.rollout.layout, history_length=config.env.history_length, max_turns=config.env.max_steps,
            max_prompt_length=config.data.max_prompt_length, max_response_length=config.data.max_response_length,
            step_timeout_s=config.env.step_timeout_s,
        )  # fmt: skip
        try:  # fail now, not mid-rollout, on a bad env name or kwargs
            make_env(config.env.name, **env_kwargs).close()
        except (ValueError, TypeError, ImportError) as err:
            raise ConfigError(f"env.name={config.env.name!r} with env.kwargs={config.env.kwargs}: {err}. Fix env.name "
                              f"or env.kwargs.") from err  # fmt: skip
        self.agent_loop = AgentLoop(self.engine, self.tokenizer, lambda: make_env(config.env.name, **env_kwargs),
                                    config.env.name, loop_config)  # fmt: skip
        self.sil = None
        if config.replay.enable_trajectory_replay:
            official = (
                config.replay.replay_trigger == "when_full_then_flush"
            )  # replay < #GPUs rows is dropped
            min_rows = config.trainer.n_gpus_per_node * config.trainer.nnodes if official else 1
            self.sil = SelfImitation(config.replay, config.algorithm, seed=tc.seed * 7919 + self.rank,
                                     min_replay_rows=min_rows)  # fmt: skip
        self.global_step = 0
        self.consecutive_skips = 0
        self.run_dir = Path(run_dir) if run_dir is not None else resolve_run_dir(config)
        self._resume()
        self.logger: MetricsLogger | None = None
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(config_to_yaml(config))
            sinks = [s for s in tc.logger if console or s != "console"]
            # a run that starts from scratch redoes its step 0 (warm-up, first eval): drop a crashed try's records
            kept_step = self.global_step if self.global_step > 0 else -1
            self.logger = build_logger(sinks, self.run_dir, tc.total_training_steps, kept_step,
                                       run_name=self.run_dir.name, config=config.model_dump(mode="json"))  # fmt: skip

    # -------------------------------------------------------------------------------------------
    # construction
    # -------------------------------------------------------------------------------------------
    def _build_backend(self) -> Any:
        a, tc = self.config.actor, self.config.trainer
        if tc.backend == "deepspeed":
            from spear_engine.train.backends import DeepSpeedBackend

            return DeepSpeedBackend(self.policy, a.lr, a.weight_decay, a.grad_clip, offload=tc.deepspeed_offload,
                                    bf16=self.config.model.dtype == "bfloat16")  # fmt: skip
        from spear_engine.train.backends import TorchBackend

        return TorchBackend(self.policy, a.lr, a.weight_decay, a.grad_clip, device=self.device)

    def _build_engine(self) -> tuple[Any, bool]:
        """(engine, shares the training weights). An engine with its own weights is wrapped in a
        :class:`ResilientEngine` (one process only: a sync retry on one rank would wait on collectives):
        if it dies it is rebuilt and re-synced with the current weights, and failed syncs are retried."""
        factory, shares = self._engine_factory()
        if shares or self.world_size > 1:
            return factory(), shares
        bucket_mb = self.config.rollout.weight_sync_bucket_mb
        return ResilientEngine(
            factory, sync_source=lambda: iter_named_weights(self.backend.hf_model, bucket_mb)
        ), False

    def _engine_factory(self) -> tuple[Any, bool]:
        """(a function that builds the rollout engine, whether the engine shares the training weights). HF on
        the plain torch backend generates with the training module itself; every other combination holds its
        own weights and is synced after each update. vLLM: one in-process engine per rank (tensor parallel 1,
        in vLLM's own world of size 1 beside the trainer's group; see ``spear_engine.rollout.vllm``), seeded
        ``trainer.seed + rank`` so the ranks sample differently; on GPU built with sleep mode on."""
        cfg = self.config
        if self.engine_name == "vllm":
            from spear_engine.rollout.vllm import VLLMEngine

            return lambda: VLLMEngine(
                cfg.model.path,
                dtype=cfg.model.dtype,
                seed=cfg.trainer.seed + self.rank,
                gpu_memory_utilization=cfg.rollout.gpu_memory_utilization,
                kv_cache_gb=cfg.rollout.kv_cache_gb,
            ), False
        from spear_engine.rollout.hf import HFEngine

        if cfg.trainer.backend == "torch":
            return lambda: HFEngine(self.backend.hf_model, share=True), True
        from spear_engine.models import load_model

        return lambda: HFEngine(load_model(cfg.model.path, dtype=cfg.model.dtype, device=self.device)[0], share=True), False

    # -------------------------------------------------------------------------------------------
    # one training step
    # -------------------------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        t = self.global_step + 1
        cfg = self.config
        clock = StageClock()
        metrics: dict[str, float] = {**schedule_metrics(cfg, t)}
        self.token_meter.reset()

        with clock("rollout"):
            episodes, rollout_timing = self._rollout(t)
            metrics.update(rollout_timing)
            if isinstance(self.engine, ResilientEngine):
                metrics.update(self.engine.metrics())
            metrics.update(episode_metrics(episodes, self._sum_over_ranks))
        if not self._any_turns(episodes):  # every env failed before its first turn: nothing to learn from
            return self._skip_empty_step(t, {**metrics, **clock.timings})

        with clock("rewards_filters"):
            batch = RolloutBatch.from_episodes(episodes, self.pad_token_id, layout=cfg.rollout.layout)
            pad_rng = np.random.default_rng((cfg.trainer.seed % 2**32, t, self.rank))  # a resumed run pads alike
            batch, m = pad_batch(cfg, batch, pad_rng, self.world_size)
            metrics.update(m)
            scored, m = score_and_filter(cfg, batch, t)
            metrics.update(m)
            scored, m = filter_groups(cfg, scored, cfg.trainer.seed * SEED_STRIDE + t)
            metrics.update(m)
            batch = scored.batch
            sequences = SequenceBatch.from_prompt_response(batch.prompts, batch.prompt_mask, batch.responses,
                                                           batch.attention_mask)  # fmt: skip

        with clock("old_log_prob"):
            policy_mask = batch.policy_mask.float()
            from_update = self._old_log_probs_from_update(len(batch))  # exactly on-policy: no separate pass
            metrics["trainer/old_log_prob_from_update"] = float(from_update)
            metrics["rollout/engine_vllm"] = float(self.engine_name == "vllm")
            old_log_probs, is_weights = None, None
            if not from_update:
                old_log_probs, entropy = self._token_stats(self.policy, sequences)
                is_weights, m = self._old_log_prob_metrics(batch, scored, old_log_probs, entropy)
                metrics.update(m)
            ref = self._token_stats(self.ref_policy, sequences)[0] if self.ref_policy is not None else None

        with clock("advantages_replay"):
            advantages, m = compute_advantages(cfg, scored, old_log_probs, ref)
            metrics.update(m)
            replay_rows, replay_before = None, None
            if self.sil is not None:
                replay_before = self.sil.state_dict()  # the draw may evict, flush, and advance the index's RNG
                replay, m = self.sil.draw(t, on_policy_rows=len(batch))
                metrics.update(m)
                replay_rows = self._replay_rows(replay).to(self.device) if replay is not None else None

        with clock("update"):
            loss_mask = scored.response_mask if cfg.actor.use_filtered_response_mask else policy_mask
            on_policy = LossRows(sequences, old_log_probs, advantages.advantages, loss_mask, is_weights, ref,
                                 tokens=sequences.row_tokens).to(self.device)  # fmt: skip
            rng_before = capture_rng_state()  # the loss may draw (Clip-Cov); a skipped step must not have drawn
            with self._engine_asleep():
                update = update_actor(
                    self._forward, self.backend, cfg.actor, on_policy, replay_rows,
                    replay_coef=metrics["schedule/replay_coef"], replay_update=cfg.replay.replay_update,
                    fused=cfg.actor.fused_loss,
                )  # fmt: skip
            metrics.update(update)
            if from_update:  # the update's first forward of each row was the old policy
                old_log_probs = on_policy.forward_log_probs
                assert old_log_probs is not None and on_policy.forward_entropy is not None
                metrics.update(
                    self._old_log_prob_metrics(batch, scored, old_log_probs, on_policy.forward_entropy)[1]
                )
            skipped = self._step_skipped(update)
            if skipped:  # nothing was learned: the generators stay as before the update, as the weights do
                restore_rng_state(rng_before)

        with clock("weight_sync"):
            self._sync_weights()

        with clock("replay_update"):
            if self.sil is not None and skipped:  # nothing was learned: the buffer stays as before the step
                self.sil.load_state_dict(replay_before)
                metrics.update({"replay/admitted_rows": 0.0, "replay/buffer_rows": float(len(self.sil))})
            elif self.sil is not None:
                rows = sil_batch(scored, advantages, old_log_probs)
                metrics.update(self.sil.update(t, rows, self._gathered_baseline(rows)))

        timings = clock.total()
        metrics.update(timings)
        metrics.update(self._throughput(metrics, timings, float(policy_mask.sum())))
        self.global_step = t
        self._track_skips(skipped)
        metrics["trainer/step_skipped"] = float(skipped)
        metrics["trainer/consecutive_skipped_steps"] = float(self.consecutive_skips)
        return metrics

    def _throughput(self, metrics: dict[str, float], timings: dict[str, float], trained: float) -> dict[str, float]:
        """Tokens per second, MFU and padding efficiency of the step, and each stage's share of its time."""
        generated = metrics.get("rollout/generated_tokens", 0.0)
        out = {
            "perf/generated_tokens_per_s": generated / max(timings["time/rollout"], 1e-9),
            "perf/trained_tokens_per_s": trained / max(timings["time/update"], 1e-9),
            **self.token_meter.metrics(self.flop_params, self.gemm_rate, timings["time/step"],
                                       timings["time/update"], generated),
        }  # fmt: skip
        for key, seconds in timings.items():
            if key != "time/step":
                out[f"share/{key.removeprefix('time/')}"] = seconds / max(timings["time/step"], 1e-9)
        return out

    def _rollout(self, t: int) -> tuple[list[Episode], dict[str, float]]:
        """This rank's prompt groups of step t (seeds derived from the step, so a resumed run sees the same)."""
        cfg = self.config
        total = cfg.data.train_batch_size
        groups = [g for g in range(total) if g % self.world_size == self.rank]
        seeds = [cfg.trainer.seed * SEED_STRIDE + (t - 1) * total + g for g in groups]
        ro = cfg.rollout
        params = SamplingParams(max_new_tokens=cfg.data.max_response_length, temperature=ro.temperature,
                                top_p=ro.top_p, top_k=ro.top_k, seed=seeds[0] * 31 + 17 if seeds else None)  # fmt: skip
        n = cfg.env.rollout.n
        episodes, timing = self.agent_loop.run(seeds, n, params, split="train")
        for e in episodes:  # global ids: unique across steps and ranks
            local = e.traj_id // n
            e.group_id = (t - 1) * total + groups[local]
            e.traj_id = e.group_id * n + (e.traj_id % n)
        return episodes, timing

    def _any_turns(self, episodes: list[Episode]) -> bool:
        """Whether every rank has at least one turn to train on (ranks must agree: the update is collective)."""
        flag = torch.tensor([float(any(e.turns for e in episodes))])
        if self.world_size > 1:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        return bool(flag.item() > 0)

    def _skip_empty_step(self, t: int, metrics: dict[str, float]) -> dict[str, float]:
        """A step without data (every env failed at reset) is skipped and counted like a non-finite one:
        model, optimizer and replay buffer unchanged; repeated, it halts the run (TrainingHalted)."""
        self.global_step = t
        self._track_skips(True)
        return {
            **metrics,
            "trainer/step_skipped": 1.0,
            "trainer/consecutive_skipped_steps": float(self.consecutive_skips),
        }

    def _sum_over_ranks(self, totals: np.ndarray) -> np.ndarray:
        if self.world_size == 1:
            return totals
        summed = torch.from_numpy(totals.copy())
        torch.distributed.all_reduce(summed)
        return summed.numpy()

    def _old_log_probs_from_update(self, rows: int) -> bool:
        """Whether the update is exactly on-policy, so its own first forward gives the old log-probs: one
        epoch, one mini-batch on every rank (all ranks decide alike), and nothing that needs the old
        log-probs before the update (rollout IS weights, KL in the reward)."""
        cfg, a = self.config, self.config.actor
        if (a.recompute_old_log_prob == "always" or a.ppo_epochs != 1 or cfg.rollout.rollout_is != "none"
                or cfg.algorithm.use_kl_in_reward):  # fmt: skip
            return False
        most = torch.tensor([float(rows)])
        if self.world_size > 1:
            torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX)
        return bool(most.item() <= a.ppo_mini_batch_size)

    def _old_log_prob_metrics(
        self, batch: RolloutBatch, scored: Any, old_log_probs: torch.Tensor, entropy: torch.Tensor
    ) -> tuple[torch.Tensor | None, dict[str, float]]:
        """(truncated IS weights or None, metrics): entropy of the rollout and the engine/trainer mismatch."""
        policy_mask = batch.policy_mask.float()
        metrics = {"rollout/entropy": float(agg_loss(entropy, policy_mask, "token-mean"))}
        if scored.response_mask.any():  # the official metric (sum-normalised in Dr.BoT modes); NaN-free
            metrics["actor/entropy_loss"] = float(
                agg_loss(entropy, scored.response_mask, self.config.actor.loss_agg_mode)
            )
        ro = self.config.rollout
        is_weights, m = rollout_correction(batch.rollout_log_probs, old_log_probs, policy_mask, ro.rollout_is,
                                           ro.rollout_is_threshold)  # fmt: skip
        return is_weights, {**metrics, **m}

    def _autocast(self) -> Any:
        """bf16 mixed precision of the trainer's passes (``actor.autocast``); weights stay in their dtype."""
        return torch.autocast(
            self.device.type, dtype=torch.bfloat16, enabled=self.config.actor.autocast == "bf16"
        )

    @contextmanager
    def _engine_asleep(self) -> Iterator[None]:
        """A rollout engine with its own weights frees its accelerator memory during the update (vLLM's sleep
        mode on GPU; a no-op on CPU and for engines without it); ``_sync_weights`` wakes it."""
        sleep = getattr(self.engine, "sleep", None) if not self.engine_shares_weights else None
        if sleep is not None:
            sleep()
        yield

    @torch.no_grad()
    def _token_stats(
        self, policy: FusedHeadPolicy | None, sequences: SequenceBatch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probs and entropies under ``policy`` (no gradient), micro-batch by micro-batch, on the CPU."""
        assert policy is not None
        parts = []
        everything = np.arange(sequences.input_ids.shape[0])
        for idx in micro_batches(sequences.row_tokens, everything, self.config.actor):  # as the update's
            rows = sequences.select(torch.as_tensor(idx))
            self.token_meter.add(
                rows.attention_mask, int(rows.response_attention.sum()), "forward", policy.packed
            )
            with self._autocast():
                out = (
                    self.backend.forward(rows.to(self.device))
                    if policy is self.policy
                    else policy(rows.to(self.device))
                )
            parts.append((out[0].cpu(), out[1].cpu()))
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def _forward(self, idx: np.ndarray, rows: LossRows, loss: TokenLoss | None = None) -> tuple[Any, ...]:
        """The training forward of rows ``idx`` (with ``loss``: the fused loss too, see ``FusedHeadPolicy``)."""
        selected = rows.inputs.select(torch.as_tensor(idx))
        self.token_meter.add(selected.attention_mask, int(selected.response_attention.sum()), "train",
                             self.policy.packed)  # fmt: skip
        with self._autocast():
            if loss is None:
                return self.backend.forward(selected.to(self.device))
            return self.backend.forward(selected.to(self.device), loss)

    def _replay_rows(self, replay: ReplayBatch) -> LossRows:
        tokens = torch.as_tensor(replay.tokens, dtype=torch.long)
        flags = torch.as_tensor(replay.mask)
        lengths = torch.as_tensor(replay.lengths)
        sequences, firsts = SequenceBatch.from_flagged_rows(tokens, (flags & MASK_ATTENTION) > 0, lengths,
                                                            self.pad_token_id)  # fmt: skip
        width = sequences.input_ids.shape[1] - sequences.prompt_width

        def aligned(values: Any) -> torch.Tensor:
            return response_aligned(torch.as_tensor(values), firsts, lengths, width)

        return LossRows(sequences, aligned(replay.logp), aligned(replay.token_advantages()),
                        aligned(replay.loss_mask()), tokens=sequences.row_tokens)  # fmt: skip

    def _gathered_baseline(self, rows: Any) -> tuple[np.ndarray, np.ndarray] | None:
        if self.world_size == 1 or self.sil is None:
            return None
        mine = self.sil.baseline_statistics(rows)
        everyone: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(everyone, mine)
        return np.concatenate([v for v, _ in everyone]), np.concatenate([s for _, s in everyone])

    @staticmethod
    def _step_skipped(update: dict[str, float]) -> bool:
        """Every optimizer step of the update was skipped (non-finite loss or gradients): the model and the
        optimizer are unchanged, and the step must not change the replay buffer either."""
        return update.get("actor/skipped_steps", 0.0) > 0 and update.get("actor/optimizer_steps", 0.0) == 0

    def _track_skips(self, skipped: bool) -> None:
        self.consecutive_skips = self.consecutive_skips + 1 if skipped else 0
        if self.consecutive_skips >= self.config.trainer.max_consecutive_skipped_steps:
            raise TrainingHalted(
                f"{self.consecutive_skips} training steps in a row were skipped: their losses or gradients were not "
                f"finite (or every environment failed, leaving no data); model, optimizer and replay buffer are "
                f"unchanged since the last good step. Stopped at step {self.global_step}; "
                f"the last good state is in {self.run_dir / 'checkpoints'}. Lower actor.lr, check the reward "
                f"scale, use model.dtype=float32, or check the environment (rollout/env_errors in the metrics)."
            )

    # -------------------------------------------------------------------------------------------
    # evaluation
    # -------------------------------------------------------------------------------------------
    def evaluate(self, episodes: int | None = None, greedy: bool = False) -> dict[str, float]:
        """Success rate on the eval split: one episode per eval seed 0..n-1 (this rank's share), in blocks of
        ``data.val_batch_size`` seeds (every rank runs every block, so collectives stay in step)."""
        n = episodes or self.config.trainer.val_episodes
        first = self.config.trainer.val_seed_offset
        block = self.config.data.val_batch_size
        ro = self.config.rollout
        results: list[Episode] = []
        timing = {"rollout/env_errors": 0.0, "rollout/env_timeouts": 0.0}
        for start in range(0, n, block):
            block_seeds = range(first + start, first + min(start + block, n))
            seeds = [s for s in block_seeds if s % self.world_size == self.rank]
            params = SamplingParams(max_new_tokens=self.config.data.max_response_length,
                                    temperature=0.0 if greedy else ro.val_temperature, top_p=ro.top_p,
                                    top_k=ro.top_k, seed=self.config.trainer.seed * 31 + 5 + start)  # fmt: skip
            episodes_done, part = self.agent_loop.run(seeds, 1, params, split="eval")
            results += episodes_done
            for key in timing:
                timing[key] += part.get(key, 0.0)
        m = episode_metrics(results, self._sum_over_ranks)
        train_slots = len(range(self.rank, self.config.data.train_batch_size, self.world_size)) * self.config.env.rollout.n
        self.agent_loop.release_envs(train_slots)  # the training step needs no more envs than this
        faults = {
            f"val/{k.removeprefix('rollout/')}": timing[k]
            for k in ("rollout/env_errors", "rollout/env_timeouts")
        }
        return {**{f"val/{k.removeprefix('episode/')}": v for k, v in m.items()}, **faults}

    def validate(self) -> dict[str, float]:
        """The scheduled evaluation: sampled (``val/*``) and, with ``trainer.val_greedy``, greedy
        (``val_greedy/*``), on the same eval seeds; ``time/eval`` is the wall time of both."""
        start = time.perf_counter()
        metrics = self.evaluate()
        if self.config.trainer.val_greedy:
            greedy = self.evaluate(greedy=True)
            metrics.update({f"val_greedy/{k.removeprefix('val/')}": v for k, v in greedy.items()})
        metrics["time/eval"] = time.perf_counter() - start
        return metrics

    # -------------------------------------------------------------------------------------------
    # the run
    # -------------------------------------------------------------------------------------------
    def fit(self) -> list[dict[str, float]]:
        tc = self.config.trainer
        history = []
        try:
            if self.global_step == 0 and tc.sft_warmup_steps > 0:
                self.warmup()
            if self.global_step == 0 and tc.test_freq and tc.val_before_train:
                before = self.validate()  # the policy every RL arm starts from: step 0, no update yet
                if self.logger is not None:
                    self.logger.log(0, before)
            while self.global_step < tc.total_training_steps:
                try:
                    metrics = self.train_step()
                except TrainingHalted:
                    self.save()
                    raise
                t = self.global_step
                last = t == tc.total_training_steps
                if tc.test_freq and (t % tc.test_freq == 0 or last):
                    metrics.update(self.validate())
                if self.logger is not None:
                    self.logger.log(t, metrics)
                history.append(metrics)
                if (tc.save_freq and t % tc.save_freq == 0) or last:
                    self.save()
        finally:
            self.close()
        return history

    def warmup(self) -> dict[str, float]:
        """The cold-start SFT on gold episodes (:mod:`spear_engine.train.sft`), logged as step 0."""
        from spear_engine.train.sft import sft_warmup

        cfg, tc = self.config, self.config.trainer
        groups = self.backend.optimizer.param_groups
        rl_lrs = [g["lr"] for g in groups]
        for g in groups:
            g["lr"] = tc.sft_lr
        if self.logger is not None:
            self.logger.status(f"SFT warm-up: playing {tc.sft_episodes} gold episodes")
        start = time.perf_counter()
        metrics = sft_warmup(
            self.backend, self.agent_loop.chat, self.agent_loop.env_factory, cfg.env.name,
            tc.sft_warmup_steps, tc.sft_episodes, tc.sft_rows_per_step, cfg.actor.ppo_micro_batch_size_per_gpu,
            layout=cfg.rollout.layout, history_length=cfg.env.history_length,
            max_prompt_length=cfg.data.max_prompt_length, pad_token_id=self.pad_token_id,
            seed=tc.seed * 100 + self.rank, log=self._sft_status,
        )  # fmt: skip
        for g, lr in zip(groups, rl_lrs):
            g["lr"] = lr
        self.backend.reset_optimizer_state()  # RL starts with fresh Adam moments
        self._sync_weights()
        metrics["time/sft"] = time.perf_counter() - start
        if self.logger is not None:
            self.logger.log(0, metrics)
        return metrics

    def _sft_status(self, step: int, metrics: dict[str, float]) -> None:
        if self.logger is not None:
            self.logger.status(
                f"SFT warm-up {step}/{self.config.trainer.sft_warmup_steps}  nll {metrics['sft/nll']:.3f}"
            )

    def close(self) -> None:
        if self.logger is not None:
            self.logger.close()
            self.logger = None
        self.agent_loop.close()

    # -------------------------------------------------------------------------------------------
    # checkpoints
    # -------------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "global_step": self.global_step,
            "consecutive_skips": self.consecutive_skips,
            "config": self.config.model_dump(mode="json"),
            "backend": self.backend.state_dict(),
            "replay": self.sil.state_dict() if self.sil is not None else None,
            "rng": capture_rng_state(),
            "world_size": self.world_size,
        }

    def save(self) -> Path:
        return save_checkpoint(self.run_dir, self.global_step, self.state(), self.config.trainer.keep_checkpoints,
                               write_extra=self.backend.write_extra, rank=self.rank,
                               barrier=self.backend.barrier if self.world_size > 1 else None)  # fmt: skip

    def load(self, folder: str | Path) -> None:
        state = load_checkpoint(folder, self.rank)
        if state["world_size"] != self.world_size:
            raise CheckpointError(f"checkpoint {folder} was written by {state['world_size']} ranks; "
                                  f"resume it with the same number (this run has {self.world_size})")  # fmt: skip
        self.backend.load_state_dict(state["backend"])
        self.backend.read_extra(Path(folder))
        if self.sil is not None and state["replay"] is not None:
            self.sil.load_state_dict(state["replay"])
        restore_rng_state(state["rng"])
        self.global_step = int(state["global_step"])
        self.consecutive_skips = int(state.get("consecutive_skips", 0))
        self._sync_weights()

    def _sync_weights(self) -> None:
        """Push the trained weights into this rank's rollout engine (every rank has its own engine; the
        ZeRO-3 gathers are collective, so all ranks walk the buckets together, each feeding its own engine).

        An engine put to sleep for the update (``_engine_asleep``) gets its weights memory back first; its
        KV cache returns only once the sync is done (``VLLMEngine.load_weights``), so the gathered buckets
        never share the accelerator with it. Engines without sleep mode (HF; vLLM on CPU) skip that."""
        sync_weights(self.backend.hf_model, self.engine, self.config.rollout.weight_sync_bucket_mb,
                     shares_weights=self.engine_shares_weights)  # fmt: skip

    def _resume(self) -> None:
        mode = self.config.trainer.resume
        if mode == "none":
            if list_checkpoints(self.run_dir):
                raise CheckpointError(f"{self.run_dir} already has checkpoints; use trainer.resume=auto to continue "
                                      f"it or choose another trainer.run_name")  # fmt: skip
            return
        folder = latest_checkpoint(self.run_dir) if mode == "auto" else Path(mode)
        if folder is not None and not folder.is_dir():
            raise CheckpointError(f"trainer.resume={mode}: no such checkpoint folder; pass a <run>/checkpoints/step_* "
                                  f"folder, auto (the newest valid checkpoint of the run) or none")  # fmt: skip
        if folder is not None:
            self.load(folder)
