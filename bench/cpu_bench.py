"""CPU benchmark: fused lm_head + logp + entropy + policy loss, forward + backward (SmolLM2 shapes).

Every variant computes the same thing from hidden X [N, H] and lm_head W [V, H]: per-token logp and
entropy, the vanilla PPO loss (token-mean) − 0.001·entropy, and dX, dW.

Time: all variants in ONE process, taking turns round-robin (these VMs drift 15-80 % between
processes), median over rounds. Memory: one fresh subprocess per variant; peak extra memory =
ru_maxrss after one call − RSS just before it (inputs, outputs of the warm-up-free call and library
scratch included; torch has no CPU allocator statistics).

    python bench/cpu_bench.py --dtype fp32 --rounds 5          # time table
    python bench/cpu_bench.py --dtype bf16 --mem               # peak-memory table (subprocesses)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
from kernels_import import import_spear_kernels

sk = import_spear_kernels()

DT = {"fp32": torch.float32, "bf16": torch.bfloat16}
ENT = 0.001


def make_inputs(n, h, v, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    b, length = 8, n // 8
    x = (torch.randn(b, length, h, generator=g) * 1.0).to(dtype)
    w = (torch.randn(v, h, generator=g) * 0.05).to(dtype)
    y = torch.randint(0, v, (b, length), generator=g)
    old = -torch.rand(b, length, generator=g) * 5
    adv = torch.randn(b, 1, generator=g).expand(b, length).contiguous()
    mask = torch.ones(b, length)
    return dict(x=x, w=w, y=y, old=old, adv=adv, mask=mask)


def _ppo_loss_torch(logp, ent, old, adv, mask):
    d = torch.clamp(logp - old, -20, 20)
    r = torch.exp(d)
    l1, l2 = -adv * r, -adv * torch.clamp(r, 0.8, 1.2)
    lc = torch.maximum(l1, l2)
    loss = torch.where(adv < 0, torch.minimum(lc, -adv * 3.0), lc)
    den = mask.sum() + 1e-8
    return (loss * mask).sum() / den - ENT * (ent * mask).sum() / den


def naive(d):
    """verl-style eager torch: full logits, fp32 upcast, log_softmax + softmax entropy, autograd."""
    x = d["x"].requires_grad_()
    w = d["w"].requires_grad_()
    logits = (x @ w.t()).float()
    logsm = torch.log_softmax(logits, -1)
    logp = logsm.gather(-1, d["y"].unsqueeze(-1)).squeeze(-1)
    ent = torch.logsumexp(logits, -1) - (torch.softmax(logits, -1) * logits).sum(-1)
    _ppo_loss_torch(logp, ent, d["old"], d["adv"], d["mask"]).backward()
    return x.grad, w.grad


_COMPILED = {}


def compiled(d):
    """The same graph through torch.compile (Inductor C++ backend), compiled once per dtype."""
    key = d["x"].dtype
    if key not in _COMPILED:
        def f(x, w, y, old, adv, mask):
            logits = (x @ w.t()).float()
            logsm = torch.log_softmax(logits, -1)
            logp = logsm.gather(-1, y.unsqueeze(-1)).squeeze(-1)
            ent = torch.logsumexp(logits, -1) - (torch.softmax(logits, -1) * logits).sum(-1)
            return _ppo_loss_torch(logp, ent, old, adv, mask)

        _COMPILED[key] = torch.compile(f)
    x = d["x"].requires_grad_()
    w = d["w"].requires_grad_()
    _COMPILED[key](x, w, d["y"], d["old"], d["adv"], d["mask"]).backward()
    return x.grad, w.grad


def ours_fused(d, chunk=None):
    """spear_kernels.fused_linear_policy_loss: backward inside the forward (6NHV), torch CPU path."""
    x = d["x"].requires_grad_()
    w = d["w"].requires_grad_()
    out = sk.fused_linear_policy_loss(
        x, w, d["y"], d["old"], d["adv"], d["mask"], loss_mode="vanilla", clip_ratio_low=0.2,
        clip_ratio_high=0.2, clip_ratio_c=3.0, entropy_coeff=ENT, chunk_size=chunk, backend="torch",
    )
    out.loss.backward()
    return x.grad, w.grad


def ours_generic(d, chunk=None):
    """spear_kernels.linear_logprob_entropy (autograd, recompute backward, 8NHV) + policy_loss."""
    x = d["x"].requires_grad_()
    w = d["w"].requires_grad_()
    logp, ent = sk.linear_logprob_entropy(x, w, d["y"], chunk_size=chunk, backend="torch")
    _ppo_loss_torch(logp, ent, d["old"], d["adv"], d["mask"]).backward()
    return x.grad, w.grad


def gemm_only(d, chunk=None):
    """The three GEMMs of the fused path over the same chunks, nothing else (the floor on this CPU)."""
    x = d["x"].reshape(-1, d["x"].shape[-1])
    w = d["w"]
    n, v = x.shape[0], w.shape[0]
    if chunk is None:
        chunk = max(1, min(n, (128 << 20) // (v * w.element_size())))
    z = torch.empty(chunk, v, dtype=w.dtype)
    dx = torch.empty_like(x)
    dw = torch.zeros(v, x.shape[1], dtype=torch.float32)
    for a in range(0, n, chunk):
        xc = x[a : a + chunk]
        zc = z[: xc.shape[0]]
        torch.mm(xc, w.t(), out=zc)
        torch.mm(zc, w, out=dx[a : a + chunk])
        if w.dtype == torch.float32:
            dw.addmm_(zc.t(), xc)
        else:
            dw.add_(zc.t() @ xc)
    return dx, dw


def liger(d):
    """Liger-Kernel's chunked torch GRPO loss (no entropy; compiled=False, one sequence per chunk)."""
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    x = d["x"].requires_grad_()
    w = d["w"].requires_grad_()
    fn = LigerFusedLinearGRPOLoss(beta=0.0, compiled=False, use_ref_model=False, chunk_size=1,
                                  epsilon_low=0.2, epsilon_high=0.2, loss_type="dapo")
    out = fn(x, w, d["y"], d["mask"], d["adv"][:, 0], old_per_token_logps=d["old"])
    loss = out[0] if isinstance(out, tuple) else out
    loss.backward()
    return x.grad, w.grad


VARIANTS = {"gemm_only": gemm_only, "ours_fused": ours_fused, "ours_generic": ours_generic, "naive": naive,
            "compile": compiled, "liger": liger}


def _has_liger() -> bool:
    try:
        import liger_kernel  # noqa: F401
        return True
    except ImportError:
        return False


def _loadavg() -> str:
    with open("/proc/loadavg") as f:
        return f.read().strip()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def mem_child(name, n, h, v, dtype):
    d = make_inputs(n, h, v, DT[dtype])
    if name == "compile":  # compile outside the measured call (its own memory is not the kernel's)
        compiled(make_inputs(64, h, 256, DT[dtype]))
    base = _rss_bytes()
    VARIANTS[name](d)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"variant": name, "extra_gb": (peak - base) / 1e9}))


def time_all(n, h, v, dtype, rounds, names):
    d0 = make_inputs(n, h, v, DT[dtype])
    times = {k: [] for k in names}
    for k in names:  # warm-up (compile, oneDNN kernels), not timed
        VARIANTS[k]({kk: vv.detach().clone() if torch.is_tensor(vv) else vv for kk, vv in d0.items()})
    for _ in range(rounds):
        for k in names:
            d = {kk: vv.detach().clone() for kk, vv in d0.items()}
            t0 = time.perf_counter()
            VARIANTS[k](d)
            times[k].append(time.perf_counter() - t0)
    return times


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--h", type=int, default=576)
    p.add_argument("--v", type=int, default=49152)
    p.add_argument("--dtype", default="fp32", choices=list(DT))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--variants", default="gemm_only,ours_fused,ours_generic,naive,compile,liger")
    p.add_argument("--mem", action="store_true", help="peak extra memory, one subprocess per variant")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    names = [k for k in a.variants.split(",") if k != "liger" or _has_liger()]
    if a.child:
        mem_child(a.child, a.n, a.h, a.v, a.dtype)
        return
    print(f"# N={a.n} H={a.h} V={a.v} dtype={a.dtype} threads={torch.get_num_threads()} torch={torch.__version__}")
    if a.mem:
        print("| variant | peak extra memory (GB) |\n|---|---|")
        for k in names:
            r = subprocess.run([sys.executable, __file__, "--child", k, "--n", str(a.n), "--h", str(a.h),
                                "--v", str(a.v), "--dtype", a.dtype], capture_output=True, text=True)
            line = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
            val = f"{json.loads(line[-1])['extra_gb']:.3f}" if line else "failed: " + r.stderr[-200:]
            print(f"| {k} | {val} |", flush=True)
        return
    print(f"# load average before: {_loadavg()}")
    t = time_all(a.n, a.h, a.v, a.dtype, a.rounds, names)
    print(f"# load average after: {_loadavg()}")
    med = {k: statistics.median(v) for k, v in t.items()}
    mn = {k: min(v) for k, v in t.items()}
    print("| variant | median s | median / gemm_only | min s | min / gemm_only |\n|---|---|---|---|---|")
    for k in t:
        if "gemm_only" in t:
            print(f"| {k} | {med[k]:.3f} | {med[k] / med['gemm_only']:.2f}x | {mn[k]:.3f} | "
                  f"{mn[k] / mn['gemm_only']:.2f}x |")
        else:
            print(f"| {k} | {med[k]:.3f} | | {mn[k]:.3f} | |")


if __name__ == "__main__":
    main()
