"""Everything a training run is made of, built from its config in one place and in a fixed order (the
order is part of a seeded run: the engine may seed the global generators): model and reference policy,
training backend, rollout engine, agent loop (after probing the environment) and the replay policy."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from spear_engine.algorithms.self_imitation import SelfImitation
from spear_engine.config import SpearConfig
from spear_engine.config_loading import ConfigError
from spear_engine.envs.base import make_env
from spear_engine.rollout.agent_loop import AgentLoop, AgentLoopConfig
from spear_engine.rollout.engine import RolloutEngine, resolve_engine_name
from spear_engine.rollout.resilient import ResilientEngine
from spear_engine.rollout.weight_sync import iter_named_weights
from spear_engine.train.backends import Backend, resolve_device
from spear_engine.train.perf import flop_params
from spear_engine.train.policy import FusedHeadPolicy
from spear_engine.train.precision import model_dtype


@dataclass
class RunParts:
    device: torch.device
    tokenizer: Any
    pad_token_id: int
    policy: FusedHeadPolicy
    ref_policy: FusedHeadPolicy | None
    flop_params: tuple[int, int]
    """(body, head) parameters that cost FLOPs per token, counted before a ZeRO-3 backend partitions them."""
    param_dtype: torch.dtype
    backend: Backend
    engine_name: str
    engine: RolloutEngine
    engine_shares_weights: bool
    """HF on the torch backend generates with the training module itself: no weight sync needed."""
    agent_loop: AgentLoop
    sil: SelfImitation | None


def build_run(config: SpearConfig) -> RunParts:
    device = resolve_device(config.trainer.device)
    policy, ref_policy, tokenizer = build_policies(config, device)
    pad_token_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    counted, param_dtype = flop_params(policy.model), next(policy.parameters()).dtype
    backend = build_backend(config, policy, device)
    check_groups_per_rank(config, backend.world_size)
    engine_name = resolve_engine_name(config.rollout.name)  # auto: vLLM where it imports, else HF
    engine, shares = build_engine(config, engine_name, backend, device)
    agent_loop = build_agent_loop(config, engine, tokenizer)
    sil = build_self_imitation(config, backend.rank)
    return RunParts(device, tokenizer, pad_token_id, policy, ref_policy, counted, param_dtype, backend, engine_name,
                    engine, shares, agent_loop, sil)  # fmt: skip


def build_policies(
    config: SpearConfig, device: torch.device
) -> tuple[FusedHeadPolicy, FusedHeadPolicy | None, Any]:
    """(the trained policy, a frozen copy when the KL loss or KL-in-reward needs reference log-probs, tokenizer)."""
    from spear_engine.models import load_model

    model, tokenizer = load_model(config.model.path, dtype=model_dtype(config.model.dtype, device), device=device)
    if config.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    temperature, packed = config.rollout.temperature, config.actor.use_remove_padding
    shared = packed and config.actor.share_prefixes
    ref_policy = None
    if config.actor.use_kl_loss or config.algorithm.use_kl_in_reward:
        ref_policy = FusedHeadPolicy(copy.deepcopy(model).eval().requires_grad_(False), temperature, packed=packed,
                                     share_prefixes=shared)  # fmt: skip
    return FusedHeadPolicy(model, temperature=temperature, packed=packed, share_prefixes=shared), ref_policy, tokenizer


def build_backend(config: SpearConfig, policy: FusedHeadPolicy, device: torch.device) -> Backend:
    a, tc = config.actor, config.trainer
    if tc.backend == "deepspeed":
        from spear_engine.train.backends import DeepSpeedBackend

        return DeepSpeedBackend(policy, a.lr, a.weight_decay, a.grad_clip, offload=tc.deepspeed_offload,
                                bf16=model_dtype(config.model.dtype, device) == "bfloat16")  # fmt: skip
    from spear_engine.train.backends import TorchBackend

    return TorchBackend(policy, a.lr, a.weight_decay, a.grad_clip, device=device)


def build_engine(
    config: SpearConfig, engine_name: str, backend: Backend, device: torch.device
) -> tuple[RolloutEngine, bool]:
    """(engine, shares the training weights). An engine with its own weights is wrapped in a
    :class:`ResilientEngine` (one process only: a sync retry on one rank would wait on collectives):
    if it dies it is rebuilt and re-synced with the current weights, and failed syncs are retried."""
    factory, shares = engine_factory(config, engine_name, backend, device)
    if shares or backend.world_size > 1:
        return factory(), shares
    bucket_mb = config.rollout.weight_sync_bucket_mb
    return ResilientEngine(factory, sync_source=lambda: iter_named_weights(backend.hf_model, bucket_mb)), False


def engine_factory(
    config: SpearConfig, engine_name: str, backend: Backend, device: torch.device
) -> tuple[Callable[[], RolloutEngine], bool]:
    """(a function that builds the rollout engine, whether the engine shares the training weights). HF on
    the plain torch backend generates with the training module itself; every other combination holds its
    own weights and is synced after each update. vLLM: one in-process engine per rank (tensor parallel 1,
    in vLLM's own world of size 1 beside the trainer's group; see ``spear_engine.rollout.vllm``), seeded
    ``trainer.seed + rank`` so the ranks sample differently; on GPU built with sleep mode on."""
    model, dtype = config.model, model_dtype(config.model.dtype, device)
    if engine_name == "vllm":
        from spear_engine.rollout.vllm import VLLMEngine

        return lambda: VLLMEngine(
            model.path,
            dtype=dtype,
            seed=config.trainer.seed + backend.rank,
            gpu_memory_utilization=config.rollout.gpu_memory_utilization,
            kv_cache_gb=config.rollout.kv_cache_gb,
            enforce_eager=config.rollout.enforce_eager,
        ), False
    from spear_engine.rollout.hf import HFEngine

    if config.trainer.backend == "torch":
        return lambda: HFEngine(backend.hf_model, share=True), True
    from spear_engine.models import load_model

    return lambda: HFEngine(load_model(model.path, dtype=dtype, device=device)[0], share=True), False


def build_agent_loop(config: SpearConfig, engine: RolloutEngine, tokenizer: Any) -> AgentLoop:
    """The multi-turn loop over this rank's environments; the environment is built once first, so a bad
    ``env.name`` or ``env.kwargs`` fails now rather than mid-rollout."""
    env_kwargs = {"max_steps": config.env.max_steps, **config.env.kwargs}
    loop_config = AgentLoopConfig(
        layout=config.rollout.layout, history_length=config.env.history_length, max_turns=config.env.max_steps,
        max_prompt_length=config.data.max_prompt_length, max_response_length=config.data.max_response_length,
        step_timeout_s=config.env.step_timeout_s,
    )  # fmt: skip
    try:
        make_env(config.env.name, **env_kwargs).close()
    except (ValueError, TypeError, ImportError) as err:
        raise ConfigError(f"env.name={config.env.name!r} with env.kwargs={config.env.kwargs}: {err}. Fix env.name "
                          f"or env.kwargs.") from err  # fmt: skip
    return AgentLoop(engine, tokenizer, lambda: make_env(config.env.name, **env_kwargs), config.env.name, loop_config)


def build_self_imitation(config: SpearConfig, rank: int) -> SelfImitation | None:
    """This rank's replay policy (None without trajectory replay). The official trigger drops a replay batch
    smaller than the number of GPUs, as the official code does."""
    if not config.replay.enable_trajectory_replay:
        return None
    tc = config.trainer
    official = config.replay.replay_trigger == "when_full_then_flush"
    min_rows = tc.n_gpus_per_node * tc.nnodes if official else 1
    return SelfImitation(config.replay, config.algorithm, seed=tc.seed * 7919 + rank, min_replay_rows=min_rows)


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
