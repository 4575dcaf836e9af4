"""GPU benchmark and correctness check of spear_kernels (written without a GPU: verify before trusting).

    python bench/gpu_bench.py --check               # correctness of every Triton path on CUDA vs the oracles
    python bench/gpu_bench.py --out $OUT            # timing table (bf16, the two shapes of issue 3)

Measures, per shape and variant: median time of forward + backward (CUDA events), TFLOP/s on the
6·N·H·V count, the ratio to the 6·N·H·V floor at the card's dense bf16 peak, and the same ratio to three
cuBLAS GEMMs of the same sizes (the floor this card actually reaches), plus peak extra memory
(max_memory_allocated − allocated before the call). The selection masks are timed against the loss and
run under torch.cuda.set_sync_debug_mode("error") to prove they never synchronise with the host.

Variants: ours (generic autograd op, 8NHV), ours fused loss in_forward (6NHV) / recompute (8NHV),
ours fused clip_cov (stats pass + 6NHV), torch eager, torch.compile, Liger-Kernel (optional: chunked
GRPO loss, fused linear cross-entropy, fused linear scaled cross-entropy with entropy: CuTe SM90 kernel and
torch fallback), Apple's Cut Cross-Entropy (Triton) and verl's Triton linear_cross_entropy (optional: from
bench/kernel_refs.sh). bench/kernel_bench.py --device cuda gives the same comparison as one table + PNG.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback

import kernel_variants as kv
import torch
from kernels_import import import_spear_kernels

sk = import_spear_kernels()
kv.add_refs_to_path()  # liger-kernel, cut-cross-entropy, verl from bench/kernel_refs.sh, when installed there
from spear_kernels import reference as ref  # noqa: E402

SHAPES = [(8192, 4096, 131072), (16384, 1536, 151936)]
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "H800": 989.4, "A100": 312.0, "B200": 2250.0, "L40S": 362.0}
ENT = 0.001


def _peak(name: str) -> float | None:
    for k, v in PEAK_BF16_TFLOPS.items():
        if k in name:
            return v
    return None


# ------------------------------------------------------------------------------------------ check
def check(dev: str = "cuda") -> list[str]:
    """Small-shape correctness of every CUDA path against the fp32 oracles. Returns failure messages."""
    fails: list[str] = []

    def close(name, a, b, tol):
        err = ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6)).item()
        ok = err <= tol and bool(torch.isfinite(a.float()).all())
        print(f"  {'ok  ' if ok else 'FAIL'} {name}: rel err {err:.2e} (tol {tol:.0e})", flush=True)
        if not ok:
            fails.append(f"{name}: {err:.3e}")

    torch.manual_seed(0)
    for dt, tol in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2)):
        n, v = 301, 5003
        logits = (torch.randn(n, v, device=dev) * 3).to(dt).requires_grad_()
        y = torch.randint(0, v, (n,), device=dev)
        gl, gh = torch.randn(n, device=dev), torch.randn(n, device=dev)
        lp, h = sk.logprob_entropy(logits, y, 0.7)
        ((lp * gl).sum() + (h * gh).sum()).backward()
        g = logits.grad.clone()
        logits.grad = None
        lr, hr = ref.logprob_entropy_ref(logits, y, 0.7)
        ((lr * gl).sum() + (hr * gh).sum()).backward()
        close(f"logprob_entropy logp {dt}", lp, lr, 1e-5)
        close(f"logprob_entropy entropy {dt}", h, hr, 1e-5)
        close(f"logprob_entropy dlogits {dt}", g, logits.grad, tol)

        n, hdim, v = 777, 256, 5003
        x = torch.randn(n, hdim, device=dev).to(dt).requires_grad_()
        w = (torch.randn(v, hdim, device=dev) * 0.05).to(dt).requires_grad_()
        b = torch.randn(v, device=dev).to(dt).requires_grad_()
        y = torch.randint(0, v, (n,), device=dev)
        gl, gh = torch.randn(n, device=dev), torch.randn(n, device=dev)
        lp, h = sk.linear_logprob_entropy(x, w, y, b, 0.8)
        ((lp * gl).sum() + (h * gh).sum()).backward()
        gx, gw, gb = x.grad.clone(), w.grad.clone(), b.grad.clone()
        x.grad = w.grad = b.grad = None
        lr, hr = ref.linear_logprob_entropy_ref(x, w, y, b, 0.8)
        ((lr * gl).sum() + (hr * gh).sum()).backward()
        close(f"linear logp {dt}", lp, lr, 1e-4)
        close(f"linear entropy {dt}", h, hr, 1e-4)
        close(f"linear dX {dt}", gx, x.grad, tol)
        close(f"linear dW {dt}", gw, w.grad, tol)
        close(f"linear db {dt}", gb, b.grad, tol)
        for mode in ("in_forward", "recompute"):
            out = sk.linear_logprob_entropy_with_grad(
                x.detach(), w.detach(), y, lambda i, j, *_, gl=gl, gh=gh: (gl[i:j], gh[i:j]), b.detach(), 0.8,
                chunk_size=300,
                mode=mode,
            )
            close(f"linear with_grad[{mode}] dX {dt}", out[2], x.grad, tol)
            close(f"linear with_grad[{mode}] dW {dt}", out[3], w.grad, tol)

        bsz, length = 7, 111
        xs = torch.randn(bsz, length, hdim, device=dev).to(dt)
        ys = torch.randint(0, v, (bsz, length), device=dev)
        old = -torch.rand(bsz, length, device=dev) * 3 - 6
        adv = torch.randn(bsz, length, device=dev)
        mask = (torch.rand(bsz, length, device=dev) > 0.2).float()
        wts = torch.rand(bsz, length, device=dev)
        for mode in ("vanilla", "clip_cov", "kl_cov", "gpg"):
            for agg in ("token-mean", "seq-mean-token-sum-norm"):
                xa, wa = xs.clone().requires_grad_(), w.detach().clone().requires_grad_()
                out = sk.fused_linear_policy_loss(
                    xa, wa, ys, old, adv, mask, loss_mode=mode, loss_agg_mode=agg, weights=wts, entropy_coeff=0.01,
                    clip_cov_ratio=0.02, clip_cov_lb=-100, clip_cov_ub=100, kl_cov_ratio=0.02,
                )
                out.loss.backward()
                xr, wr = xs.clone().requires_grad_(), w.detach().clone().requires_grad_()
                lref, _, _ = ref.fused_linear_policy_loss_ref(
                    xr, wr, ys, old, adv, mask, loss_mode=mode, loss_agg_mode=agg, weights=wts, entropy_coeff=0.01,
                    selected=out.selected,
                )
                lref.backward()
                close(f"fused loss {mode}/{agg} {dt}", out.loss.reshape(1), lref.reshape(1), 1e-3)
                close(f"fused loss {mode}/{agg} dX {dt}", xa.grad, xr.grad, tol)
                close(f"fused loss {mode}/{agg} dW {dt}", wa.grad, wr.grad, tol)

    # selection masks: exact count, candidates only, no host sync
    bsz, length = 16, 1024
    logp = -torch.rand(bsz, length, device=dev) * 4
    old = logp + torch.randn(bsz, length, device=dev) * 0.3
    adv = torch.randn(bsz, 1, device=dev).expand(bsz, length).contiguous()
    mask = (torch.rand(bsz, length, device=dev) > 0.2).float()
    cfg = dict(clip_ratio_low=0.2, clip_ratio_high=0.28, clip_cov_ratio=0.01, clip_cov_lb=-0.5, clip_cov_ub=2.0)
    if dev == "cuda":
        sync_ok = sync_free(
            lambda: (sk.clip_cov_mask(logp, old, adv, mask, **cfg), sk.kl_cov_mask(logp, adv, mask, 0.01))
        )
        print(f"  {'ok  ' if sync_ok else 'FAIL'} selection masks run without host synchronisation")
        if not sync_ok:
            fails.append("selection masks synchronise")
    sel = sk.clip_cov_mask(logp, old, adv, mask, **cfg, generator=torch.Generator(dev).manual_seed(0))
    cand, k = ref.clip_cov_candidates_ref(logp, old, adv, mask, **cfg)
    ok = int(sel.sum()) == min(k, int(cand.sum())) and not bool((sel & ~cand).any())
    print(f"  {'ok  ' if ok else 'FAIL'} clip_cov count {int(sel.sum())} == min({k}, {int(cand.sum())}), candidates only")
    if not ok:
        fails.append("clip_cov count/candidates")
    ok = torch.equal(sk.kl_cov_mask(logp, adv, mask, 0.01), ref.kl_cov_selected_ref(logp, adv, mask, 0.01))
    print(f"  {'ok  ' if ok else 'FAIL'} kl_cov equals the top-k oracle")
    if not ok:
        fails.append("kl_cov")
    return fails


def sync_free(fn) -> bool:
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return True
    except RuntimeError as e:
        print("    sync:", str(e).splitlines()[0])
        return False
    finally:
        torch.cuda.set_sync_debug_mode(0)


# ------------------------------------------------------------------------------------------ timing
def make(n, h, v, dt, dev="cuda", seed=0):
    g = torch.Generator(dev).manual_seed(seed)
    bsz = 16
    length = n // bsz
    x = torch.randn(bsz, length, h, device=dev, generator=g).to(dt)
    w = (torch.randn(v, h, device=dev, generator=g) * (1.0 / h**0.5)).to(dt)
    y = torch.randint(0, v, (bsz, length), device=dev, generator=g)
    old = -torch.rand(bsz, length, device=dev, generator=g) * 5
    adv = torch.randn(bsz, 1, device=dev, generator=g).expand(bsz, length).contiguous()
    mask = torch.ones(bsz, length, device=dev)
    return dict(x=x, w=w, y=y, old=old, adv=adv, mask=mask)


def _ppo(logp, ent, old, adv, mask):
    r = torch.exp(torch.clamp(logp - old, -20, 20))
    lc = torch.maximum(-adv * r, -adv * torch.clamp(r, 0.8, 1.2))
    loss = torch.where(adv < 0, torch.minimum(lc, -adv * 3.0), lc)
    den = mask.sum() + 1e-8
    return (loss * mask).sum() / den - ENT * (ent * mask).sum() / den


def v_ours_generic(d):
    logp, ent = sk.linear_logprob_entropy(d["x"], d["w"], d["y"])
    _ppo(logp, ent, d["old"], d["adv"], d["mask"]).backward()


def _fused(d, **kw):
    sk.fused_linear_policy_loss(d["x"], d["w"], d["y"], d["old"], d["adv"], d["mask"], clip_ratio_low=0.2,
                                clip_ratio_high=0.2, entropy_coeff=ENT, **kw).loss.backward()


def v_naive(d):
    logits = (d["x"] @ d["w"].t()).float()
    logp = torch.log_softmax(logits, -1).gather(-1, d["y"].unsqueeze(-1)).squeeze(-1)
    ent = torch.logsumexp(logits, -1) - (torch.softmax(logits, -1) * logits).sum(-1)
    _ppo(logp, ent, d["old"], d["adv"], d["mask"]).backward()


_COMPILED = []


def v_compile(d):
    if not _COMPILED:
        def f(x, w, y, old, adv, mask):
            logits = (x @ w.t()).float()
            logp = torch.log_softmax(logits, -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
            ent = torch.logsumexp(logits, -1) - (torch.softmax(logits, -1) * logits).sum(-1)
            return _ppo(logp, ent, old, adv, mask)

        _COMPILED.append(torch.compile(f))
    _COMPILED[0](d["x"], d["w"], d["y"], d["old"], d["adv"], d["mask"]).backward()


def v_liger_grpo(d):
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    fn = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, epsilon_low=0.2, epsilon_high=0.2, loss_type="dapo")
    out = fn(d["x"], d["w"], d["y"], d["mask"], d["adv"][:, 0], old_per_token_logps=d["old"])
    (out[0] if isinstance(out, tuple) else out).backward()


def v_liger_flce(d):
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    h = d["x"].shape[-1]
    loss = liger_fused_linear_cross_entropy(d["x"].reshape(-1, h), d["w"], d["y"].reshape(-1))
    (loss[0] if isinstance(loss, tuple) else loss).backward()


def v_verl_triton(d):
    linear_cross_entropy = kv.load_verl_lce()  # full verl, or its kernel module alone (a --no-deps install)
    h = d["x"].shape[-1]
    logp, ent = linear_cross_entropy(d["x"].reshape(-1, h), d["w"], d["y"].reshape(-1), 1.0, "none")
    _ppo(logp.view(d["old"].shape), ent.view(d["old"].shape), d["old"], d["adv"], d["mask"]).backward()


def v_gemm_floor(d):
    """Three cuBLAS GEMMs of the full sizes (X·Wᵀ, dZ·W, dZᵀ·X): what this card reaches for 6NHV."""
    h = d["x"].shape[-1]
    x = d["x"].reshape(-1, h)
    z = x.detach() @ d["w"].detach().t()
    _ = z @ d["w"].detach()
    _ = z.t() @ x.detach()


VARIANTS = {
    "gemm_floor (cuBLAS 6NHV)": v_gemm_floor,
    "ours generic (8NHV)": v_ours_generic,
    "ours fused vanilla in_forward": lambda d: _fused(d, loss_mode="vanilla"),
    "ours fused vanilla in_forward chunk4096": lambda d: _fused(d, loss_mode="vanilla", chunk_size=4096),
    "ours fused vanilla recompute": lambda d: _fused(d, loss_mode="vanilla", backward_mode="recompute"),
    "ours fused clip_cov (2 pass)": lambda d: _fused(d, loss_mode="clip_cov", clip_cov_ratio=2e-4),
    "torch eager": v_naive,
    "torch.compile": v_compile,
    "liger chunked GRPO (no entropy)": v_liger_grpo,
    "liger FLCE (CE only)": v_liger_flce,
    "verl triton linear_cross_entropy": v_verl_triton,
    "liger FLSCE CuTe sm90 (logp + entropy)": kv.liger_flsce_cute,
    "liger FLSCE torch fallback (logp + entropy)": kv.liger_flsce_torch,
    "cce triton (per-token NLL, no entropy)": kv.cce,
}


def bench_one(fn, d, reps):
    for t in (d["x"], d["w"]):
        t.grad = None
    d["x"].requires_grad_()
    d["w"].requires_grad_()
    fn(d)  # warm-up / compile / autotune
    torch.cuda.synchronize()
    d["x"].grad = d["w"].grad = None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn(d)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    times = []
    for _ in range(reps):
        d["x"].grad = d["w"].grad = None
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn(d)
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    d["x"].grad = d["w"].grad = None
    return statistics.median(times), peak


def bench_masks(n, reps=50):
    """Selection masks vs the policy loss from logp, at n tokens; host syncs checked separately."""
    bsz = 16
    length = n // bsz
    logp = -torch.rand(bsz, length, device="cuda") * 4
    old = logp + torch.randn(bsz, length, device="cuda") * 0.3
    adv = torch.randn(bsz, 1, device="cuda").expand(bsz, length).contiguous()
    mask = torch.ones(bsz, length, device="cuda")
    gen = torch.Generator("cuda").manual_seed(0)

    def timed(fn):
        fn()
        torch.cuda.synchronize()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(reps):
            fn()
        e.record()
        torch.cuda.synchronize()
        return s.elapsed_time(e) / reps

    clip = timed(lambda: sk.clip_cov_mask(logp, old, adv, mask, generator=gen))
    kl = timed(lambda: sk.kl_cov_mask(logp, adv, mask))
    sync_ok = sync_free(lambda: (
        sk.clip_cov_mask(logp, old, adv, mask, generator=gen), sk.kl_cov_mask(logp, adv, mask),
        sk.policy_loss(logp.clone().requires_grad_(), old, adv, mask, "clip_cov", generator=gen).loss,
    ))
    return clip, kl, sync_ok


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--check", action="store_true")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--only", default="", help="comma-separated substrings of variant names")
    p.add_argument("--shapes", default="", help="e.g. 8192x4096x131072,16384x1536x151936")
    a = p.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to do")
        sys.exit(0 if not a.check else 1)
    name = torch.cuda.get_device_name()
    print(f"# device {name}, torch {torch.__version__}, spear_kernels from {os.path.dirname(sk.__file__)}")
    if a.check:
        fails = check()
        print(f"check: {len(fails)} failure(s)")
        sys.exit(1 if fails else 0)
    shapes = SHAPES if not a.shapes else [tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",")]
    peak_tf = _peak(name)
    rows = []
    for n, h, v in shapes:
        flops6 = 6.0 * n * h * v
        d = make(n, h, v, torch.bfloat16)
        grad_bytes = (d["x"].numel() + d["w"].numel()) * 2  # dX and dW themselves (outputs, bf16)
        floor_ms = None
        for vname, fn in VARIANTS.items():
            if a.only and not any(s in vname for s in a.only.split(",")) and not vname.startswith("gemm_floor"):
                continue
            try:
                t0 = time.time()
                ms, peak = bench_one(fn, d, a.reps)
                if vname.startswith("gemm_floor"):
                    floor_ms = ms
                row = dict(shape=f"{n}x{h}x{v}", variant=vname, ms=ms, tflops_6nhv=flops6 / ms / 1e9,
                           vs_peak_floor=(ms / (flops6 / peak_tf / 1e9)) if peak_tf else None,
                           vs_cublas_floor=(ms / floor_ms) if floor_ms else None, peak_extra_gib=peak / 2**30,
                           peak_extra_minus_grads_gib=(peak - grad_bytes) / 2**30,
                           wall_s=time.time() - t0)
            except Exception as e:  # OOM, missing optional package, API drift: record and go on
                row = dict(shape=f"{n}x{h}x{v}", variant=vname, error=f"{type(e).__name__}: {str(e)[:160]}")
                if not isinstance(e, ImportError | ModuleNotFoundError):
                    traceback.print_exc(limit=2)
                torch.cuda.empty_cache()
            rows.append(row)
            print(json.dumps(row), flush=True)
        del d
        torch.cuda.empty_cache()
        clip_ms, kl_ms, sync_ok = bench_masks(n)
        loss_ms = next((r["ms"] for r in rows if r.get("shape") == f"{n}x{h}x{v}"
                        and r["variant"] == "ours fused vanilla in_forward" and "ms" in r), None)
        rows.append(dict(shape=f"{n}x{h}x{v}", variant="masks", clip_cov_mask_ms=clip_ms, kl_cov_mask_ms=kl_ms,
                         pct_of_fused_loss=(100 * (clip_ms + kl_ms) / loss_ms) if loss_ms else None,
                         zero_host_syncs=sync_ok))
        print(json.dumps(rows[-1]), flush=True)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "gpu_bench.json"), "w") as f:
        json.dump(dict(device=name, torch=torch.__version__, rows=rows), f, indent=1)
    lines = [f"device: {name} (bf16 dense peak {peak_tf} TFLOP/s)",
             "| shape NxHxV | variant | ms | TFLOP/s (6NHV) | x 6NHV@peak | x cuBLAS 3 GEMMs | peak extra GiB "
             "| same without dX, dW |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["variant"] == "masks":
            lines.append(f"| {r['shape']} | masks: clip_cov {r['clip_cov_mask_ms']:.3f} ms, kl_cov "
                         f"{r['kl_cov_mask_ms']:.3f} ms = {r['pct_of_fused_loss'] or float('nan'):.2f}% of fused loss, "
                         f"zero host syncs: {r['zero_host_syncs']} | | | | | | |")
        elif "error" in r:
            lines.append(f"| {r['shape']} | {r['variant']} | {r['error'][:60]} | | | | | |")
        else:
            f = lambda x, k=".2f": "-" if x is None else format(x, k)  # noqa: E731
            lines.append(f"| {r['shape']} | {r['variant']} | {r['ms']:.1f} | {r['tflops_6nhv']:.0f} | "
                         f"{f(r['vs_peak_floor'])} | {f(r['vs_cublas_floor'])} | {r['peak_extra_gib']:.2f} | "
                         f"{r['peak_extra_minus_grads_gib']:.2f} |")
    table = "\n".join(lines)
    with open(os.path.join(a.out, "gpu_bench.md"), "w") as f:
        f.write(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
