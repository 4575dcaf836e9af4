"""The trainer: builds a run (:mod:`spear_engine.train.build`) and drives it. ``Trainer.train_step`` reads as
the data-flow picture: rollout → the step on the batch (:func:`spear_engine.step.train_on_batch`: rewards
and filters → old log-probs → advantages → self-imitation draw → actor update → replay buffer update) →
weight sync → metrics; ``fit`` adds the SFT warm-up, evaluations and checkpoints.

Ranks (DeepSpeed ZeRO-3): each rank rolls out whole prompt groups (groups are never split), keeps its
own replay index, and pushes the baseline statistics of *all* ranks (gathered) so every rank's baseline
is the same; the loss normalisation uses global token / sequence counts, so N ranks reproduce one
process on the same data.
"""

from __future__ import annotations

import random
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spear_engine.config import SpearConfig
from spear_engine.config_loading import config_to_yaml
from spear_engine.data import Episode, RolloutBatch
from spear_engine.metrics import MetricsLogger, StageClock, build_logger, episode_metrics
from spear_engine.pipeline import schedule_metrics
from spear_engine.rollout.engine import SamplingParams
from spear_engine.rollout.resilient import ResilientEngine
from spear_engine.rollout.weight_sync import sync_weights
from spear_engine.step import SEED_STRIDE, train_on_batch
from spear_engine.train import collectives
from spear_engine.train.build import build_run, check_groups_per_rank
from spear_engine.train.checkpoint import (
    CheckpointError,
    capture_rng_state,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from spear_engine.train.learner import PolicyLearner
from spear_engine.train.perf import TokenMeter, gemm_flops_per_s

__all__ = ["SEED_STRIDE", "Trainer", "TrainingHalted", "check_groups_per_rank", "resolve_run_dir", "seed_everything"]


class TrainingHalted(RuntimeError):
    """Training stopped on purpose (e.g. repeated non-finite steps); the last good state is checkpointed."""


def resolve_run_dir(config: SpearConfig) -> Path:
    name = config.trainer.run_name or f"{config.preset}-{config.env.name}-{datetime.now():%Y%m%d-%H%M%S}"
    return Path(config.trainer.output_dir) / name


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """One training run: its parts (model, backend, rollout engine, agent loop, replay), step, evaluation,
    checkpoints and logs."""

    def __init__(self, config: SpearConfig, run_dir: str | Path | None = None, console: bool = True) -> None:
        self.config = config
        tc = config.trainer
        seed_everything(tc.seed)
        if tc.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        parts = build_run(config)
        self.device, self.tokenizer, self.pad_token_id = parts.device, parts.tokenizer, parts.pad_token_id
        self.policy, self.ref_policy, self.backend = parts.policy, parts.ref_policy, parts.backend
        self.rank, self.world_size = self.backend.rank, self.backend.world_size
        self.engine_name, self.engine, self.engine_shares_weights = parts.engine_name, parts.engine, parts.engine_shares_weights
        self.agent_loop, self.sil = parts.agent_loop, parts.sil
        self.flop_params = parts.flop_params
        self.token_meter = TokenMeter()
        self.learner = PolicyLearner(
            config, self.policy, self.ref_policy, self.backend, self.engine, self.engine_shares_weights,
            self.device, self.pad_token_id, self.token_meter,
            baseline_of=self.sil.baseline_statistics if self.sil is not None else None,
        )  # fmt: skip
        compute_dtype = torch.bfloat16 if self.learner.bf16_autocast else parts.param_dtype
        self.gemm_rate = gemm_flops_per_s(compute_dtype, self.device.type)  # once per process and dtype
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
    # one training step
    # -------------------------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        t = self.global_step + 1
        clock = StageClock()
        metrics: dict[str, float] = {}
        self.token_meter.reset()

        with clock("rollout"):
            episodes, rollout_timing = self._rollout(t)
            metrics.update(rollout_timing)
            if isinstance(self.engine, ResilientEngine):
                metrics.update(self.engine.metrics())
            metrics.update(episode_metrics(episodes, self._sum_over_ranks))
        if not collectives.all_ranks(any(e.turns for e in episodes), self.world_size):
            return self._skip_empty_step(t, {**schedule_metrics(self.config, t), **metrics, **clock.timings})

        batch = RolloutBatch.from_episodes(episodes, self.pad_token_id, layout=self.config.rollout.layout)
        outcome = train_on_batch(self.config, t, batch, self.learner, self.sil, clock)
        metrics.update(outcome.metrics)
        metrics["rollout/engine_vllm"] = float(self.engine_name == "vllm")
        metrics["actor/bf16_autocast"] = float(self.learner.bf16_autocast)  # what actor.autocast=auto chose here

        with clock("weight_sync"):
            self._sync_weights()

        timings = clock.total()
        metrics.update(timings)
        metrics.update(self._throughput(metrics, timings, float(outcome.scored.batch.policy_mask.sum())))
        self.global_step = t
        self._track_skips(outcome.skipped)
        metrics["trainer/step_skipped"] = float(outcome.skipped)
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
        return collectives.sum_over_ranks(totals, self.world_size)

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
            self.backend, self.tokenizer, self.agent_loop.env_factory, cfg.env.name, self.agent_loop.config,
            tc.sft_warmup_steps, tc.sft_episodes, tc.sft_rows_per_step, cfg.actor.ppo_micro_batch_size_per_gpu,
            pad_token_id=self.pad_token_id, seed=self.sft_seed, log=self._sft_status,
        )  # fmt: skip
        for g, lr in zip(groups, rl_lrs):
            g["lr"] = lr
        self.backend.reset_optimizer_state()  # RL starts with fresh Adam moments
        self._sync_weights()
        metrics["time/sft"] = time.perf_counter() - start
        if self.logger is not None:
            self.logger.log(0, metrics)
        return metrics

    @property
    def sft_seed(self) -> int:
        """Seed of this rank's SFT warm-up (its gold episodes and row order)."""
        return self.config.trainer.seed * 100 + self.rank

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

        An engine put to sleep for the update (``PolicyLearner.updating``) gets its weights memory back first; its
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
