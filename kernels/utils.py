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
POISON_ENV = "SPEAR_KERNELS_POISON"
"""Debug switch: ``SPEAR_KERNELS_POISON=1`` fills every buffer the kernels allocate with a NaN of a
known bit pattern, and checks after each kernel that no element of its outputs still holds it. A
kernel (or a BLAS call) that reads memory nobody wrote then gives NaN every time instead of now and
then, and an output region a kernel forgot to write fails loudly with the buffer's name. The test
suite runs with it on (tests/conftest.py). Off, the buffers are plain ``torch.empty``."""

_POISON_BITS = {
    torch.float32: (torch.int32, 0x7FBADBAD),  # a NaN no arithmetic produces (torch's NaN is 0x7FC00000)
    torch.bfloat16: (torch.int16, 0x7FAB),
    torch.float16: (torch.int16, 0x7E5B),
}
"""Float dtype -> (integer view dtype, NaN bit pattern) of the poison."""


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


def poisoning() -> bool:
    """True when ``SPEAR_KERNELS_POISON`` asks for NaN-filled scratch buffers (read at call time)."""
    return os.environ.get(POISON_ENV, "0") not in ("", "0")


def _poison_value(dtype: torch.dtype) -> tuple[torch.dtype, int] | None:
    if dtype in _POISON_BITS:
        return _POISON_BITS[dtype]
    if dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
        return None
    return dtype, torch.iinfo(dtype).min  # integer buffers: the most negative value, never a valid count/flag


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill ``t`` with the poison pattern of its dtype (in place); returns ``t``."""
    pv = _poison_value(t.dtype)
    if pv is not None:
        t.view(pv[0]).fill_(pv[1])
    return t


def scratch(*shape: int, dtype: torch.dtype, device: torch.device | str | None = None) -> torch.Tensor:
    """``torch.empty`` for every buffer a kernel allocates; poisoned under ``SPEAR_KERNELS_POISON``."""
    t = torch.empty(*shape, dtype=dtype, device=device)
    return poison_(t) if poisoning() else t


def scratch_like(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A contiguous :func:`scratch` buffer of ``t``'s shape and device."""
    return scratch(*t.shape, dtype=t.dtype if dtype is None else dtype, device=t.device)


def check_written(where: str, **buffers: torch.Tensor | None) -> None:
    """Under ``SPEAR_KERNELS_POISON``: raise if an element of a buffer that must be fully written still
    holds the poison (no-op, and no host sync, when the switch is off)."""
    if not poisoning():
        return
    for name, t in buffers.items():
        pv = None if t is None else _poison_value(t.dtype)
        if pv is None or t.numel() == 0:
            continue
        count = int((t.contiguous().view(pv[0]) == pv[1]).sum().item())
        if count:
            raise RuntimeError(
                f"{where}: {count} of {t.numel()} elements of '{name}' {tuple(t.shape)} were never written "
                f"(still hold the {POISON_ENV} pattern)"
            )


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
