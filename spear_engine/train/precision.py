"""Which precision the trainer's matrix products run in (``actor.autocast``), decided once per run.

bf16 autocast pays only where the hardware multiplies bf16 natively: CUDA GPUs from Ampere on, and x86
CPUs with AVX512-BF16 or AMX (Intel Cooper Lake / Sapphire Rapids and later, AMD Zen 4 and later). There a
bf16 GEMM runs 2-3x faster than fp32. On a CPU without them (AVX2 only, e.g. AMD Zen 3 or Intel before
Cooper Lake) oneDNN has no bf16 kernel and torch falls back to a slow path: on an AMD EPYC Zen 3 (cpu family
25, model 1), 2 threads, a square bf16 GEMM ran at 0.0017 TFLOP/s (576) and 0.0010 (1024) against 0.130 and
0.138 in fp32, 75-145x slower, so a bf16 step would be too. ``auto`` therefore means bf16 where it is native
and the model's own dtype elsewhere; ``bf16`` forces it (with a warning where it is not native, e.g. to check
bf16 numerics on any machine).
"""

from __future__ import annotations

import logging

import torch

from spear_engine.config import AutocastSetting, ModelDtype

log = logging.getLogger(__name__)


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bf16 in hardware: a CUDA device with bf16 support (no emulation), an x86
    CPU with AVX512-BF16 or AMX tiles. Other CPUs (e.g. ARM) count as not native: torch does not say there,
    and fp32 is the safe guess."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    if device.type == "cpu":
        probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
        return any(bool(probe()) for probe in probes if probe is not None)
    return False


def autocast_bf16(setting: AutocastSetting, device: torch.device) -> bool:
    """Whether the trainer's passes run under bf16 autocast for ``actor.autocast=setting`` on ``device``."""
    if setting == "none":
        return False
    native = native_bf16(device)
    if setting == "auto":
        return native
    if setting != "bf16":
        raise ValueError(f"actor.autocast must be one of none, bf16, auto (got {setting!r})")
    if not native:
        log.warning(
            "actor.autocast=bf16 on a %s without native bf16 products (no AVX512-BF16/AMX on a CPU): bf16 GEMMs "
            "run emulated here (75-145x slower than fp32 on an AMD EPYC Zen 3). actor.autocast=auto picks bf16 only "
            "where it is native.",
            device.type,
        )
    return True


def model_dtype(setting: ModelDtype, device: torch.device) -> str:
    """The dtype the model's weights load in for ``model.dtype=setting`` on ``device``: ``auto`` is bfloat16
    where bf16 is native (bf16 weights with fp32 master copies in the optimizer, and a bf16 rollout engine),
    float32 elsewhere."""
    if setting == "auto":
        return "bfloat16" if native_bf16(device) else "float32"
    if setting not in ("float32", "bfloat16"):
        raise ValueError(f"model.dtype must be one of float32, bfloat16, auto (got {setting!r})")
    return setting
