"""Stream a training model's weights to a rollout engine in size-bounded buckets.

The trainer's parameters are read as ``(HF name, tensor)`` pairs grouped into buckets of at most
``bucket_mb`` MB. For a DeepSpeed ZeRO-3 model each bucket is gathered with
``deepspeed.zero.GatheredParameters`` just before it is handed over and re-partitioned right after,
so the full model never has to fit in memory at once. Gathering is a collective: **every rank must
call** :func:`sync_weights` (or walk :func:`iter_weight_buckets`); each rank pushes into its own engine
(one rollout engine per rank), a rank without one (``engine=None``) only takes part in the gathers.

Two rules keep engines simple:

- A bucket never splits the parameters of one module (``...self_attn.q_proj/k_proj/v_proj`` share
  the parent ``...self_attn``): engines that fuse sibling weights (vLLM's ``qkv_proj``,
  ``gate_up_proj``) see each fused group complete inside one bucket. A module larger than the bucket
  size gets a bucket of its own.
- Tied parameters are sent once, under their first name (``model.embed_tokens.weight``; not the
  ``lm_head.weight`` alias). Both engines tie the same way the checkpoint does, so this is all they need.

The tensors of a bucket are views of the live (or gathered) parameters: valid until the next bucket
is requested; engines copy them.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

NamedTensors = list[tuple[str, torch.Tensor]]
DEFAULT_BUCKET_MB = 256.0


@dataclass
class SyncStats:
    """What one :func:`sync_weights` call moved and how long it took (this rank's view)."""

    seconds: float
    bytes: int
    tensors: int
    buckets: int


def unwrap_model(model: nn.Module) -> nn.Module:
    """The HF module inside a DeepSpeedEngine / DDP (``.module``) or ``torch.compile`` (``._orig_mod``) wrapper,
    so that parameter names are the checkpoint's."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def is_zero3_param(param: torch.Tensor) -> bool:
    """True for a parameter managed (partitioned) by DeepSpeed ZeRO-3."""
    return hasattr(param, "ds_id")


def _full_bytes(param: torch.Tensor) -> int:
    numel = param.ds_numel if is_zero3_param(param) else param.numel()
    return int(numel) * param.element_size()


def _parent(name: str) -> str:
    return name.rpartition(".")[0]


def plan_buckets(
    model: nn.Module, bucket_mb: float = DEFAULT_BUCKET_MB
) -> list[list[tuple[str, nn.Parameter]]]:
    """Group the (deduplicated) named parameters into buckets of at most ``bucket_mb`` MB, never
    splitting one module's parameters. The plan depends only on names and shapes, so every rank
    computes the same one."""
    if bucket_mb <= 0:
        raise ValueError(f"bucket_mb must be > 0, got {bucket_mb}")
    limit = bucket_mb * 2**20
    groups: list[list[tuple[str, nn.Parameter]]] = []
    for name, param in unwrap_model(model).named_parameters():
        if groups and _parent(groups[-1][-1][0]) == _parent(name):
            groups[-1].append((name, param))
        else:
            groups.append([(name, param)])
    buckets: list[list[tuple[str, nn.Parameter]]] = []
    size = 0.0
    for group in groups:
        group_bytes = sum(_full_bytes(p) for _, p in group)
        if buckets and size + group_bytes <= limit:
            buckets[-1].extend(group)
            size += group_bytes
        else:
            buckets.append(list(group))
            size = group_bytes
    return buckets


def _gathered(params: list[nn.Parameter]) -> AbstractContextManager[object]:
    if not any(is_zero3_param(p) for p in params):
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def iter_weight_buckets(model: nn.Module, bucket_mb: float = DEFAULT_BUCKET_MB) -> Iterator[NamedTensors]:
    """Yield buckets of ``(HF name, full tensor)``; ZeRO-3 parameters are gathered per bucket.

    Collective for ZeRO-3: all ranks must exhaust this iterator together.
    """
    for bucket in plan_buckets(model, bucket_mb):
        params = [p for _, p in bucket]
        with torch.no_grad(), _gathered(params):
            yield [(name, p.detach()) for name, p in bucket]


def iter_named_weights(
    model: nn.Module, bucket_mb: float = DEFAULT_BUCKET_MB
) -> Iterator[tuple[str, torch.Tensor]]:
    """The buckets of :func:`iter_weight_buckets`, flattened: one lazy stream an engine can consume in a
    single ``load_weights`` call while the gathers happen underneath."""
    for bucket in iter_weight_buckets(model, bucket_mb):
        yield from bucket


def sync_weights(
    model: nn.Module,
    engine: object | None,
    bucket_mb: float = DEFAULT_BUCKET_MB,
    *,
    shares_weights: bool = False,
) -> SyncStats:
    """Push ``model``'s weights into ``engine`` (a :class:`~spear_engine.rollout.engine.RolloutEngine`):
    the one weight-sync path, the trainer's and the benchmarks'.

    Call on every rank: each rank with an engine pushes into it (one engine per rank); a rank with
    ``engine=None`` only takes part in the ZeRO-3 gathers. An engine with a ``wake_up`` (vLLM sleep mode)
    gets its weights memory back first (``wake_up(["weights"])``; its KV cache returns once the reload is
    done). The engine receives the whole update as one lazy stream (one ``load_weights`` call), so it can
    apply it in a single pass and finish before this returns. ``shares_weights``: the engine runs on
    ``model``'s own parameters (HF shared mode), so there is nothing to move and this is a no-op.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"sync_weights(model, engine, ...): model must be a torch module, got {type(model).__name__}")
    if shares_weights:
        return SyncStats(0.0, 0, 0, 0)
    start = time.perf_counter()
    counted = {"bytes": 0, "tensors": 0, "buckets": 0}

    def counting(buckets: Iterable[NamedTensors]) -> Iterator[tuple[str, torch.Tensor]]:
        for bucket in buckets:
            counted["buckets"] += 1
            for name, tensor in bucket:
                counted["tensors"] += 1
                counted["bytes"] += tensor.numel() * tensor.element_size()
                yield name, tensor

    stream = counting(iter_weight_buckets(model, bucket_mb))
    if engine is None:
        for _ in stream:
            pass
    else:
        wake_up = getattr(engine, "wake_up", None)
        if wake_up is not None:
            wake_up(["weights"])
        engine.load_weights(stream)  # type: ignore[attr-defined]
        for _ in stream:  # an engine that stopped early must not leave other ranks in a gather
            pass
    return SyncStats(time.perf_counter() - start, counted["bytes"], counted["tensors"], counted["buckets"])
