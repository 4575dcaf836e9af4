"""Dispatch, shape checks and Triton launch helpers shared by every op of ``spear_kernels``.

Dispatch rule (see DESIGN.md): CUDA tensors run the Triton kernels, CPU tensors run a chunked torch
path with bounded memory. ``SPEAR_KERNELS_BACKEND=triton`` (or ``backend="triton"`` on an entry point)
forces the Triton kernels on CPU tensors too; that only works under ``TRITON_INTERPRET=1`` set before
this package is imported, which is how the tests exercise the kernels without a GPU.
"""

from __future__ import annotations

import os
from typing import Literal

import torch

try:  # triton is optional on CPU-only installs: the torch paths still work without it.
    import triton
    import triton.language as tl  # noqa: F401  (re-exported for the op modules)

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only on installs without triton
    triton = None
    HAS_TRITON = False

Backend = Literal["auto", "triton", "torch"]

BACKEND_ENV = "SPEAR_KERNELS_BACKEND"


def interpreting() -> bool:
    """True when Triton runs its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(t: torch.Tensor, backend: Backend | None = "auto") -> bool:
    """Pick the implementation for a tensor: Triton on CUDA, chunked torch on CPU, unless forced."""
    choice = backend if backend not in (None, "auto") else os.environ.get(BACKEND_ENV, "auto")
    if choice == "torch":
        return False
    if choice == "triton":
        if not HAS_TRITON:
            raise RuntimeError("backend='triton' requested but triton is not installed")
        if t.device.type != "cuda" and not interpreting():
            raise RuntimeError(
                "backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before spear_kernels is imported"
            )
        return True
    if choice != "auto":
        raise ValueError(f"unknown backend {choice!r}; expected 'auto', 'triton' or 'torch'")
    return t.device.type == "cuda" and HAS_TRITON


def next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def row_block(v: int, cap: int = 4096) -> int:
    """Vocabulary block for the row kernels: large under the interpreter (each program step is slow
    there), register-sized on a GPU."""
    limit = 16384 if interpreting() else cap
    return max(16, min(next_pow2(v), limit))


def check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    devices = {k: v.device for k, v in tensors.items() if v is not None}
    if len(set(devices.values())) > 1:
        raise ValueError(f"tensors on different devices: {devices}")


def as_f32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float32 else t.float()
