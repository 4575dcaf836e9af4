"""Dispatch, shape checks, Triton launch helpers and the loss aggregation shared by every op of ``spear_kernels``.

Dispatch rule: CUDA tensors run the Triton kernels, CPU tensors run a chunked torch
path with bounded memory. ``SPEAR_KERNELS_BACKEND=triton`` (or ``backend="triton"`` on an entry point)
forces the Triton kernels on CPU tensors too; that only works under ``TRITON_INTERPRET=1`` set before
this package is imported, which is how the tests exercise the kernels without a GPU.
``SPEAR_KERNELS_BACKEND=torch`` forces the torch path everywhere; ``torch_compile`` does too, with the
fused linear op's CPU epilogue compiled by inductor. It is the project's one backend switch: spear_engine
reads the same variable (through :func:`use_triton`).

Loss aggregation (verl 0.9 ``agg_loss``, with the global token / sequence counts data-parallel ranks
need) is defined once, here: :func:`agg_loss` (the scalar) and :func:`agg_scale` (the same as per-token
weights, what the fused kernels sum).
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Literal

import torch

try:  # triton is optional on CPU-only installs: the torch paths still work without it.
    import triton
    import triton.language as tl  # noqa: F401  (re-exported for the op modules)

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only on installs without triton
    triton = None
    HAS_TRITON = False

Backend = Literal["auto", "triton", "torch", "torch_compile"]
"""``torch_compile``: the torch path, with the fused linear op's CPU epilogue compiled by inductor
(``linear_cpu``); everything else runs as under ``torch``."""

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


def backend_choice(backend: Backend | None = "auto") -> str:
    """The backend in force: ``backend`` unless it is "auto" / None, else ``SPEAR_KERNELS_BACKEND``."""
    choice = backend if backend not in (None, "auto") else os.environ.get(BACKEND_ENV, "auto")
    if choice not in ("auto", "triton", "torch", "torch_compile"):
        raise ValueError(f"unknown backend {choice!r}; expected 'auto', 'triton', 'torch' or 'torch_compile'")
    return choice


def use_triton(t: torch.Tensor, backend: Backend | None = "auto") -> bool:
    """Pick the implementation for a tensor: Triton on CUDA, chunked torch on CPU, unless forced."""
    choice = backend_choice(backend)
    if choice in ("torch", "torch_compile"):
        return False
    if choice == "triton":
        if not HAS_TRITON:
            raise RuntimeError("backend='triton' requested but triton is not installed")
        if t.device.type != "cuda" and not interpreting():
            raise RuntimeError(
                "backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before spear_kernels is imported"
            )
        return True
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


# ----------------------------------------------------------------------------------------------
# loss aggregation: verl 0.9 ``agg_loss``, the one definition (the kernels, their reference and the
# engine's verl-style losses all aggregate through it)

AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
_SEQ_MODES = ("seq-mean-token-sum", "seq-mean-token-sum-norm", "seq-mean-token-mean")


def masked_sum(values: torch.Tensor, mask: torch.Tensor, axis: int | tuple[int, ...] | None = None) -> torch.Tensor:
    """Sum of ``values`` where ``mask`` is non-zero (bool or numeric mask, weights multiply).

    Values outside the mask are replaced by 0 before multiplying, so NaN/inf padding cannot leak in.
    """
    kept = torch.where(mask.bool(), values, 0.0)
    return (kept * mask).sum(dim=axis)


def _agg_count(
    mask: torch.Tensor,
    loss_agg_mode: str,
    dp_size: int,
    batch_num_tokens: int | float | torch.Tensor | None,
    global_batch_size: int | float | torch.Tensor | None,
) -> int | float | torch.Tensor | None:
    """The count verl 0.9 divides by in ``loss_agg_mode``: tokens (token-mean), non-empty rows (seq-mean-*),
    none (token-sum). The global count when given; the micro-batch's own only when ``dp_size == 1``."""
    if loss_agg_mode == "token-mean":
        if batch_num_tokens is not None:
            return batch_num_tokens
        if dp_size > 1:
            raise ValueError("token-mean with dp_size > 1 needs the global batch_num_tokens")
        return mask.sum()
    if loss_agg_mode == "token-sum":
        return None
    if loss_agg_mode in _SEQ_MODES:
        if global_batch_size is not None:
            return global_batch_size
        if dp_size > 1:
            raise ValueError(f"{loss_agg_mode} with dp_size > 1 needs the global_batch_size")
        return (mask.sum(dim=-1) > 0).float().sum()
    raise ValueError(f"Invalid loss_agg_mode: {loss_agg_mode!r}; expected one of {list(AGG_MODES)}")


def agg_loss(
    loss_mat: torch.Tensor,
    loss_mask: torch.Tensor,
    loss_agg_mode: str,
    dp_size: int = 1,
    batch_num_tokens: int | float | torch.Tensor | None = None,
    global_batch_size: int | float | torch.Tensor | None = None,
    loss_scale_factor: float | None = None,
) -> torch.Tensor:
    """Reduce a ``[B, T]`` token-loss matrix to a scalar: verl 0.9.1 ``core_algos.agg_loss``, bit for bit.

    With ``m`` the mask, ``S_i = Σ_k l_ik m_ik``, ``N = batch_num_tokens`` (default ``Σ m``) and
    ``G = global_batch_size`` (default: the rows with a non-empty mask):

    * ``token-mean``: ``Σ l m / N · dp``; ``token-sum``: ``Σ l m · dp``;
    * ``seq-mean-token-sum``: ``Σ_i S_i / G · dp``;
    * ``seq-mean-token-sum-norm`` (Dr.GRPO): the same divided by ``loss_scale_factor`` (default ``T``);
    * ``seq-mean-token-mean``: ``Σ_i [S_i / (Σ_k m_ik + 1e-8)] / G · dp``.

    ``dp_size > 1`` needs the global ``batch_num_tokens`` / ``global_batch_size`` (summed over the
    data-parallel ranks); the ranks' gradients are then averaged. A mask without any valid token gives
    0 / 0 = NaN with the default counts, as verl 0.9. NaN/inf at masked positions never leak in (verl
    guards only the token modes). :func:`agg_scale` is the same aggregation as per-token weights.
    The older verl of the official SPEAR code: pass :func:`legacy_global_batch_info`.
    """
    count = _agg_count(loss_mask, loss_agg_mode, dp_size, batch_num_tokens, global_batch_size)
    if loss_agg_mode == "token-mean":
        return masked_sum(loss_mat, loss_mask) / count * dp_size
    if loss_agg_mode == "token-sum":
        return masked_sum(loss_mat, loss_mask) * dp_size
    tokens_per_row = loss_mask.sum(dim=-1)
    row_sums = masked_sum(loss_mat, loss_mask, axis=-1)
    if loss_agg_mode == "seq-mean-token-mean":
        row_sums = row_sums / (tokens_per_row + 1e-8)
    loss = masked_sum(row_sums, (tokens_per_row > 0).float()) / count * dp_size
    if loss_agg_mode == "seq-mean-token-sum-norm":
        loss = loss / (loss_mask.shape[-1] if loss_scale_factor is None else loss_scale_factor)
    return loss


def agg_scale(
    mask: torch.Tensor,
    loss_agg_mode: str,
    dp_size: int = 1,
    batch_num_tokens: int | float | torch.Tensor | None = None,
    global_batch_size: int | float | torch.Tensor | None = None,
    loss_scale_factor: float | None = None,
    *,
    denominator: float | torch.Tensor | None = None,
    norm_length: float | None = None,
) -> torch.Tensor:
    """Per-token weights ``s`` (mask folded in, fp32, ``mask``'s shape and device) with
    ``agg_loss(l, mask, mode, **info) == Σ s·l``: verl 0.9's aggregation as the factor each token's loss
    gets, so a kernel (or a trainer summing micro-batches) only sums. Same arguments as :func:`agg_loss`:

    ``m / N · dp`` (token-mean), ``m · dp`` (token-sum), ``m / G · dp`` (seq-mean-token-sum),
    ``m / G · dp / loss_scale_factor`` (seq-mean-token-sum-norm, default factor ``T``),
    ``m / G · dp / (Σ_k m_ik + 1e-8)`` (seq-mean-token-mean).

    A masked token weighs exactly 0, also when nothing is valid (where ``agg_loss`` gives verl's 0 / 0 =
    NaN, the weights give a loss of 0). ``denominator`` / ``norm_length`` are the deprecated names of
    ``batch_num_tokens`` / ``loss_scale_factor``.
    """
    if denominator is not None or norm_length is not None:
        warnings.warn("agg_scale(denominator=, norm_length=) are deprecated: pass batch_num_tokens= / "
                      "loss_scale_factor= (verl 0.9's names)", DeprecationWarning, stacklevel=2)  # fmt: skip
        if (denominator is not None and batch_num_tokens is not None) or (
            norm_length is not None and loss_scale_factor is not None
        ):
            raise ValueError("pass batch_num_tokens / loss_scale_factor, not also their deprecated names")
        batch_num_tokens = denominator if denominator is not None else batch_num_tokens
        loss_scale_factor = norm_length if norm_length is not None else loss_scale_factor
    m = mask.float()
    count = _agg_count(m, loss_agg_mode, dp_size, batch_num_tokens, global_batch_size)
    if loss_agg_mode == "token-sum":
        scale = m * dp_size
    else:
        scale = m / count * dp_size
        if loss_agg_mode == "seq-mean-token-mean":
            scale = scale / (m.sum(-1, keepdim=True) + 1e-8)
        elif loss_agg_mode == "seq-mean-token-sum-norm":
            scale = scale / (m.shape[-1] if loss_scale_factor is None else loss_scale_factor)
    return torch.where(m != 0, scale, torch.zeros_like(scale))


def legacy_global_batch_info(loss_agg_mode: str, response_mask: torch.Tensor) -> dict[str, Any]:
    """:func:`agg_loss` / :func:`agg_scale` kwargs that reproduce the older verl of the official SPEAR code
    (its vendored copy), whose ``agg_loss`` took no batch info and normalised each micro-batch on its own:

    ``token-mean`` = ``Σ l m / (Σ m + 1e-8)``; ``seq-mean-token-sum`` = mean over all ``B`` rows, empty
    ones included; ``seq-mean-token-sum-norm`` = ``Σ l m / T`` (*not* divided by the number of rows);
    ``seq-mean-token-mean`` = mean over all rows of ``S_i / Σ_k m_ik``. Same value for every mask, except
    that an empty row in ``seq-mean-token-mean`` made the old value NaN and here counts as 0.
    """
    rows = response_mask.shape[0]
    if loss_agg_mode == "token-mean":
        return {"batch_num_tokens": response_mask.sum() + 1e-8}
    if loss_agg_mode == "token-sum":
        return {}
    if loss_agg_mode in ("seq-mean-token-sum", "seq-mean-token-mean"):
        return {"global_batch_size": rows}
    if loss_agg_mode == "seq-mean-token-sum-norm":
        return {"global_batch_size": 1}
    raise ValueError(f"Invalid loss_agg_mode: {loss_agg_mode!r}; expected one of {list(AGG_MODES)}")


_OUT_DTYPE_MM: bool | None = None


def mm_acc_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, product: torch.Tensor | None = None) -> None:
    """acc += a @ b without a copy of a or b in another dtype.

    * ``acc`` in a's dtype (fp32, or a half dtype on CPU): the GEMM adds into it itself (beta = 1), the GEMM
      accumulating in fp32 and rounding the running sum once per call.
    * ``acc`` fp32 with half inputs: on CUDA one GEMM with an fp32 output; elsewhere the partial product is
      rounded once to the half dtype, then added in fp32. ``product``: a buffer of a @ b's shape and dtype for
      that fallback, reused across calls (a fresh large tensor per call is a fresh mmap and its page faults
      every time)."""
    global _OUT_DTYPE_MM
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
        return
    acc32 = acc
    if _OUT_DTYPE_MM is not False and a.is_cuda:
        try:  # torch >= 2.8 on CUDA: bf16 GEMM with fp32 output, accumulated into acc32 by the GEMM itself
            torch.addmm(acc32, a, b, out_dtype=torch.float32, out=acc32)
            _OUT_DTYPE_MM = True
            return
        except (RuntimeError, TypeError, ValueError, NotImplementedError):
            _OUT_DTYPE_MM = False
    # one rounding of the chunk's partial product, fp32 sum across chunks
    acc32.add_(a @ b if product is None else torch.mm(a, b, out=product))
