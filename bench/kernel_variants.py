"""The variants the kernel benchmarks time, in one registry (bench/kernel_bench.py, cpu_bench.py, gpu_bench.py).

Every variant starts from the same inputs (``make_inputs``): hidden X [B, T, H], lm_head W [V, H], labels,
old log-probs, advantages, mask. Those that give per-token log-probs go on to the same vanilla PPO loss
(token-mean, dual-clip) − 0.001·entropy (the entropy term only where the variant returns entropy), and every
variant runs backward to dX and dW. Each returns (dX, dW).

A variant that cannot run where it is asked to raises ``NotRunnable`` with the reason (a Triton or CuTe
kernel on CPU), or ImportError when its package is missing; the bench lists it with that reason instead of
dropping it. The reference packages (liger-kernel, cut-cross-entropy, verl) come from bench/kernel_refs.sh,
installed with --no-deps into bench/.kernel-refs next to the project's torch; ``add_refs_to_path`` appends
that folder to sys.path (appended, so the project's own packages always win).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch
from kernels_import import import_spear_kernels

sk = import_spear_kernels()
from spear_kernels.linear_logprob_entropy import cpu_chunk_rows  # noqa: E402  (after the import above)
from spear_kernels.utils import mm_acc_  # noqa: E402

DT = {"fp32": torch.float32, "bf16": torch.bfloat16}
ENT = 0.001
REFS_DIR = os.environ.get(
    "SPEAR_KERNEL_REFS", os.path.join(os.path.dirname(os.path.abspath(__file__)), ".kernel-refs")
)
TRITON_ON_CPU = ("Triton kernel, needs a CUDA device (on this CPU triton finds '0 active drivers'; "
                 "TRITON_INTERPRET=1 would only emulate it, far too slowly to time)")


class NotRunnable(RuntimeError):
    """The variant cannot run on this device or build; the message says why."""


def add_refs_to_path() -> None:
    if os.path.isdir(REFS_DIR) and REFS_DIR not in sys.path:
        sys.path.append(REFS_DIR)


# ------------------------------------------------------------------------------------------ inputs, loss
def make_inputs(n, h, v, dtype, seed=0, device="cpu"):
    """N = 8 rows × N/8 tokens; the same values on every device (drawn on the CPU, then moved)."""
    g = torch.Generator().manual_seed(seed)
    b, length = 8, n // 8
    x = (torch.randn(b, length, h, generator=g) * 1.0).to(dtype)
    w = (torch.randn(v, h, generator=g) * 0.05).to(dtype)
    y = torch.randint(0, v, (b, length), generator=g)
    old = -torch.rand(b, length, generator=g) * 5
    adv = torch.randn(b, 1, generator=g).expand(b, length).contiguous()
    mask = torch.ones(b, length)
    return {k: t.to(device) for k, t in dict(x=x, w=w, y=y, old=old, adv=adv, mask=mask).items()}


def ppo_loss(logp, ent, old, adv, mask):
    """Vanilla PPO (dual-clip, ratio clip 0.2, c = 3), token-mean, minus ENT·entropy when ``ent`` is given."""
    d = torch.clamp(logp - old, -20, 20)
    r = torch.exp(d)
    l1, l2 = -adv * r, -adv * torch.clamp(r, 0.8, 1.2)
    lc = torch.maximum(l1, l2)
    loss = torch.where(adv < 0, torch.minimum(lc, -adv * 3.0), lc)
    den = mask.sum() + 1e-8
    out = (loss * mask).sum() / den
    return out if ent is None else out - ENT * (ent * mask).sum() / den


def _leaves(d):
    return d["x"].requires_grad_(), d["w"].requires_grad_()


def _backend(x):
    return "torch" if x.device.type == "cpu" else "auto"


def _need_cuda(x, what=TRITON_ON_CPU):
    if x.device.type != "cuda":
        raise NotRunnable(what)


# ------------------------------------------------------------------------------------------ ours
def gemm_only(d, chunk=None):
    """The floor: the three GEMMs of the fused path (X·Wᵀ, dZ·W, dZᵀ·X). On CPU over the same chunks as our
    chunked torch path (what that path cannot avoid on this CPU); on CUDA three full cuBLAS GEMMs."""
    x = d["x"].reshape(-1, d["x"].shape[-1])
    w = d["w"]
    if x.device.type == "cuda":
        z = x @ w.t()
        return z @ w, z.t() @ x
    n, v = x.shape[0], w.shape[0]
    if chunk is None:
        chunk = cpu_chunk_rows(n, v, w.dtype)
    z = torch.empty(chunk, v, dtype=w.dtype)
    dx = torch.empty_like(x)
    dw = torch.zeros(v, x.shape[1], dtype=w.dtype)
    for a in range(0, n, chunk):
        xc = x[a : a + chunk]
        zc = z[: xc.shape[0]]
        torch.mm(xc, w.t(), out=zc)
        torch.mm(zc, w, out=dx[a : a + chunk])
        mm_acc_(dw, zc.t(), xc)  # as the op does: dW accumulated by the GEMM in the weight's dtype
    return dx, dw


def ours_fused(d, chunk=None):
    """spear_kernels.fused_linear_policy_loss: backward inside the forward (6NHV); chunked torch on CPU,
    Triton on CUDA."""
    x, w = _leaves(d)
    out = sk.fused_linear_policy_loss(
        x, w, d["y"], d["old"], d["adv"], d["mask"], loss_mode="vanilla", clip_ratio_low=0.2,
        clip_ratio_high=0.2, clip_ratio_c=3.0, entropy_coeff=ENT, chunk_size=chunk, backend=_backend(x),
    )
    out.loss.backward()
    return x.grad, w.grad


def ours_fused_compiled(d, chunk=None):
    """ours_fused with backend="torch_compile": the CPU path's fp32 epilogue compiled by inductor (the
    compilation happens in the untimed warm-up)."""
    x, w = _leaves(d)
    if x.device.type != "cpu":
        raise NotRunnable("the compiled epilogue is the CPU path's; on CUDA ours_fused runs the Triton kernels")
    out = sk.fused_linear_policy_loss(
        x, w, d["y"], d["old"], d["adv"], d["mask"], loss_mode="vanilla", clip_ratio_low=0.2,
        clip_ratio_high=0.2, clip_ratio_c=3.0, entropy_coeff=ENT, chunk_size=chunk, backend="torch_compile",
    )
    out.loss.backward()
    return x.grad, w.grad


def ours_generic(d, chunk=None):
    """spear_kernels.linear_logprob_entropy (autograd, recompute backward, 8NHV) + the loss in torch."""
    x, w = _leaves(d)
    logp, ent = sk.linear_logprob_entropy(x, w, d["y"], chunk_size=chunk, backend=_backend(x))
    ppo_loss(logp, ent, d["old"], d["adv"], d["mask"]).backward()
    return x.grad, w.grad


# ------------------------------------------------------------------------------------------ plain torch
def _logp_ent_full(x, w, y):
    logits = (x @ w.t()).float()
    logp = torch.log_softmax(logits, -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
    ent = torch.logsumexp(logits, -1) - (torch.softmax(logits, -1) * logits).sum(-1)
    return logp, ent


def naive(d):
    """verl-style eager torch: full logits, fp32 upcast, log_softmax + softmax entropy, autograd."""
    x, w = _leaves(d)
    logp, ent = _logp_ent_full(x, w, d["y"])
    ppo_loss(logp, ent, d["old"], d["adv"], d["mask"]).backward()
    return x.grad, w.grad


_COMPILED = {}


def compiled(d):
    """The same graph through torch.compile (Inductor; C++ on CPU), compiled once per dtype and device."""
    key = (d["x"].dtype, d["x"].device.type)
    if key not in _COMPILED:
        def f(x, w, y, old, adv, mask):
            logp, ent = _logp_ent_full(x, w, y)
            return ppo_loss(logp, ent, old, adv, mask)

        _COMPILED[key] = torch.compile(f)
    x, w = _leaves(d)
    _COMPILED[key](x, w, d["y"], d["old"], d["adv"], d["mask"]).backward()
    return x.grad, w.grad


# ------------------------------------------------------------------------------------------ Liger-Kernel
def liger_grpo(d, compiled=False):
    """Liger's chunked fused-linear GRPO loss (torch, one sequence a chunk, autograd per chunk), uncompiled as
    in cpu_bench.py. No entropy term: it has none."""
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    x, w = _leaves(d)
    fn = LigerFusedLinearGRPOLoss(beta=0.0, compiled=compiled, use_ref_model=False, chunk_size=1,
                                  epsilon_low=0.2, epsilon_high=0.2, loss_type="dapo")
    out = fn(x, w, d["y"], d["mask"], d["adv"][:, 0], old_per_token_logps=d["old"])
    (out[0] if isinstance(out, tuple) else out).backward()
    return x.grad, w.grad


def liger_grpo_compiled(d):
    """The same with Liger's default compiled=True (its per-chunk loss under torch.compile)."""
    return liger_grpo(d, compiled=True)


def _liger_flsce_loss(d, fn):
    x, w = _leaves(d)
    h = x.shape[-1]
    nll, ent = fn(x.reshape(-1, h), w, d["y"].reshape(-1))
    shape = d["old"].shape
    ppo_loss(-nll.view(shape), ent.view(shape).float(), d["old"], d["adv"], d["mask"]).backward()
    return x.grad, w.grad


def liger_flsce_torch(d):
    """Liger's fused linear *scaled* cross-entropy, per-token NLL + entropy, through its chunked torch fallback
    (512 tokens a chunk, from verl's FusedLinearForPPO): what Liger runs off Hopper, on CPU included."""
    from liger_kernel.ops.fused_linear_scaled_cross_entropy import _FusedLinearPPOFallbackFunction as F

    return _liger_flsce_loss(d, lambda x, w, y: F.apply(x, w, y, 1.0, -100, True))


def liger_flsce_cute(d):
    """Liger's CuTe-DSL SM90 fused linear scaled cross-entropy with entropy (the fastest known kernel for
    per-token logp + entropy). Its public entry falls back to torch silently off sm_90, so this checks first."""
    x = d["x"]
    _need_cuda(x, "CuTe-DSL kernel for CUDA sm_90 (Hopper) only")
    from liger_kernel.ops import LigerFusedLinearScaledCrossEntropyFunction as F

    if torch.cuda.get_device_capability(x.device) != (9, 0):
        cc = "".join(map(str, torch.cuda.get_device_capability(x.device)))
        raise NotRunnable(f"CuTe-DSL kernel for sm_90 only; this card is sm_{cc}")
    if x.dtype != torch.bfloat16:
        raise NotRunnable("CuTe-DSL kernel takes bf16 only")
    if importlib.util.find_spec("cutlass") is None:
        raise ImportError("cutlass.cute is not installed (Liger's 'cutedsl' extra: nvidia-cutlass-dsl, apache-tvm-ffi; "
                          "not in bench/kernel_refs.sh)")
    return _liger_flsce_loss(d, lambda x, w, y: F.apply(x, w, y, 1.0, -100, 1, True))


def liger_flce(d):
    """Liger's Triton fused linear cross-entropy: CE mean only (no per-token logp, no entropy)."""
    _need_cuda(d["x"])
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    x, w = _leaves(d)
    loss = liger_fused_linear_cross_entropy(x.reshape(-1, x.shape[-1]), w, d["y"].reshape(-1))
    (loss[0] if isinstance(loss, tuple) else loss).backward()
    return x.grad, w.grad


# ------------------------------------------------------------------------------------------ Apple CCE
def _cce_loss(d, impl):
    if impl == "cce":
        _need_cuda(d["x"])
    from cut_cross_entropy import linear_cross_entropy

    x, w = _leaves(d)
    nll = linear_cross_entropy(x, w, d["y"], reduction="none", impl=impl)  # per-token NLL, any upstream grad
    ppo_loss(-nll.float(), None, d["old"], d["adv"], d["mask"]).backward()
    return x.grad, w.grad


def cce(d):
    """Apple's Cut Cross-Entropy, Triton kernels (logits never stored; gradient filtering at eps(dtype)/32).
    Per-token NLL only: no entropy."""
    return _cce_loss(d, "cce")


def cce_torch_compile(d):
    """Cut Cross-Entropy's torch implementation (impl='torch_compile'): full logits + F.cross_entropy under
    torch.compile, not memory-efficient; the one CCE path that runs on CPU. No entropy."""
    return _cce_loss(d, "torch_compile")


# ------------------------------------------------------------------------------------------ verl
_VERL = []


def load_verl_lce():
    """verl's ``linear_cross_entropy`` (verl/utils/kernel/linear_cross_entropy.py). From a full verl install
    when ``import verl`` works; else the module alone, loaded by path from its (--no-deps) install: the
    packages ``verl``, ``verl.utils`` and ``verl.plugin`` are registered bare (their __init__, which imports
    ray and tensordict, is not run), and verl's own utils/device.py and plugin/platform load as they are."""
    if _VERL:
        return _VERL[0]
    try:
        from verl.utils.kernel.linear_cross_entropy import linear_cross_entropy
    except ImportError:
        spec = importlib.util.find_spec("verl") if "verl" not in sys.modules else None
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("No module named 'verl'") from None
        root = next(iter(spec.submodule_search_locations))
        for name in ("verl", "verl.utils", "verl.plugin"):
            pkg = types.ModuleType(name)
            pkg.__path__ = [os.path.join(root, *name.split(".")[1:])]
            sys.modules[name] = pkg
        linear_cross_entropy = importlib.import_module("verl.utils.kernel.linear_cross_entropy").linear_cross_entropy
    _VERL.append(linear_cross_entropy)
    return linear_cross_entropy


def verl_triton(d):
    """verl's Triton fused linear cross-entropy with entropy (per-token logp + entropy, any upstream grad)."""
    _need_cuda(d["x"], "Triton kernel, CUDA only (it opens torch.cuda.nvtx ranges, which fail on a CPU build, "
                       "and asserts hidden.is_cuda)")
    lce = load_verl_lce()
    x, w = _leaves(d)
    h = x.shape[-1]
    logp, ent = lce(x.reshape(-1, h), w, d["y"].reshape(-1), 1.0, "none")
    shape = d["old"].shape
    ppo_loss(logp.view(shape), ent.view(shape), d["old"], d["adv"], d["mask"]).backward()
    return x.grad, w.grad


# ------------------------------------------------------------------------------------------ registry
@dataclass(frozen=True)
class Variant:
    name: str
    fn: Callable[[dict], tuple]
    computes: str  # what it computes, in a few words
    entropy: str  # "yes" | "no" | "n/a": whether it returns per-token entropy
    ours: bool = False


VARIANTS: dict[str, Variant] = {v.name: v for v in [
    Variant("gemm_only", gemm_only, "3 GEMMs (the floor)", "n/a"),
    Variant("ours_fused", ours_fused, "logp + entropy -> PPO loss (6NHV)", "yes", ours=True),
    Variant("ours_fused_compiled", ours_fused_compiled, "logp + entropy -> PPO loss (6NHV)", "yes", ours=True),
    Variant("ours_generic", ours_generic, "logp + entropy -> PPO loss (8NHV)", "yes", ours=True),
    Variant("naive", naive, "logp + entropy -> PPO loss", "yes"),
    Variant("compile", compiled, "logp + entropy -> PPO loss", "yes"),
    Variant("liger_grpo", liger_grpo, "GRPO/PPO loss, no entropy term", "no"),
    Variant("liger_grpo_compiled", liger_grpo_compiled, "GRPO/PPO loss, no entropy term", "no"),
    Variant("liger_flsce_torch", liger_flsce_torch, "NLL + entropy -> PPO loss", "yes"),
    Variant("liger_flsce_cute", liger_flsce_cute, "NLL + entropy -> PPO loss", "yes"),
    Variant("liger_flce", liger_flce, "CE mean only", "no"),
    Variant("cce", cce, "NLL -> PPO loss, no entropy", "no"),
    Variant("cce_torch_compile", cce_torch_compile, "NLL -> PPO loss, no entropy", "no"),
    Variant("verl_triton", verl_triton, "logp + entropy -> PPO loss", "yes"),
]}
