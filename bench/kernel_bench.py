"""Fused lm_head + log-prob + entropy + policy loss, forward + backward: ours against every reference, one table.

    bash bench/kernel_refs.sh                                    # once: liger-kernel, cut-cross-entropy, verl
    python bench/kernel_bench.py --device cpu --out bench/results/kernels_cpu      # fp32 and bf16
    python bench/kernel_bench.py --device cuda --out $OUT                          # bf16

Variants (bench/kernel_variants.py): the GEMM floor, ours (fused 6NHV, generic 8NHV), eager torch,
torch.compile, Liger-Kernel (chunked GRPO loss; fused linear scaled CE with entropy, torch fallback and the
CuTe SM90 kernel; Triton FLCE), Apple's Cut Cross-Entropy (Triton; its torch_compile implementation) and
verl's Triton linear_cross_entropy. A variant that cannot run on the device (a Triton or CuTe kernel on
CPU) or whose package is missing stays in the table with the reason.

Time: all variants in ONE process, taking turns round-robin after one untimed warm-up each (compile,
autotune, oneDNN primitives), median and min over rounds; on CUDA each call is timed with CUDA events.
Ratio: median / median of gemm_only in the same process (CPU: the three GEMMs over our path's chunks;
CUDA: three full cuBLAS GEMMs).
Peak extra memory, CPU: one fresh subprocess per variant (torch has no CPU allocator statistics and
tracemalloc does not see torch's allocations), with glibc's mmap threshold fixed at 64 KiB so that freed
tensors go back to the OS; after one warm-up call the kernel's RSS high-water mark is reset
(/proc/self/clear_refs), and peak extra = VmHWM after one call − VmRSS just before it (dX, dW and library
scratch included). CUDA: max_memory_allocated − memory_allocated before the call, in this process.

Prints the markdown table last and writes kernels_<device>.{md,json,png} to --out.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kernel_variants as kv

kv.add_refs_to_path()

from spear_engine.machine import cpu_model  # noqa: E402

MMAP_THRESHOLD = 65536


# ------------------------------------------------------------------------------------------ helpers
def loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "n/a"


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _clone(d):
    return {k: t.detach().clone() for k, t in d.items()}


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def reason_of(e: BaseException, device: str) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if isinstance(e, kv.NotRunnable):
        return f"not run on {device}: {msg}"
    if isinstance(e, ImportError):
        hint = "" if "kernel_refs" in msg or "cutlass" in msg else " (bash bench/kernel_refs.sh installs it)"
        return f"not installed: {msg}{hint}"
    return f"failed: {type(e).__name__}: {msg[:200]}"


# ------------------------------------------------------------------------------------------ memory
def mem_child(name: str, n: int, h: int, v: int, dtype: str) -> None:
    """Run in a fresh process: peak extra bytes of one call of one variant on CPU, printed as JSON."""
    fn = kv.VARIANTS[name].fn
    d0 = kv.make_inputs(n, h, v, kv.DT[dtype])
    fn(_clone(d0))  # warm-up: compile, lazy imports, oneDNN primitives
    gc.collect()
    d = _clone(d0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        base = _status_kb("VmRSS") * 1024
        fn(d)
        peak = _status_kb("VmHWM") * 1024
        method = "VmHWM after clear_refs"
    except OSError:  # no clear_refs: the process peak (warm-up included) is all there is
        base = _status_kb("VmRSS") * 1024
        fn(d)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        method = "ru_maxrss (clear_refs unavailable; includes the warm-up)"
    print(json.dumps({"variant": name, "extra_bytes": peak - base, "method": method}), flush=True)


def mem_cpu(name, n, h, v, dtype) -> tuple[float | None, str | None]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD), MALLOC_TRIM_THRESHOLD_="0")
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", name, "--n", str(n), "--h", str(h),
                        "--v", str(v), "--dtypes", dtype], capture_output=True, text=True, env=env)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        return None, "memory run failed: " + (r.stderr.strip().splitlines() or ["?"])[-1][:160]
    return json.loads(lines[-1])["extra_bytes"] / 1e9, None


def mem_cuda(fn, d) -> float:
    d = _clone(d)
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn(d)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 1e9


# ------------------------------------------------------------------------------------------ one dtype
def run_dtype(names, n, h, v, dtype, device, rounds, mem=True, log=print):
    """Rows for every name: timing round-robin in this process, memory per variant."""
    d0 = kv.make_inputs(n, h, v, kv.DT[dtype], device=device)
    rows = {k: dict(dtype=dtype, variant=k, computes=kv.VARIANTS[k].computes, entropy=kv.VARIANTS[k].entropy)
            for k in names}
    runnable = []
    for k in names:  # warm-up, untimed; a variant that cannot run keeps its reason
        try:
            t0 = time.perf_counter()
            kv.VARIANTS[k].fn(_clone(d0))
            _sync(device)
            runnable.append(k)
            log(f"  warm-up {dtype} {k}: {time.perf_counter() - t0:.2f} s")
        except Exception as e:  # missing package, not runnable here, OOM, API drift: record and go on
            rows[k]["note"] = reason_of(e, device)
            log(f"  {dtype} {k}: {rows[k]['note']}")
            if device == "cuda":
                torch.cuda.empty_cache()
    times = {k: [] for k in runnable}
    for r in range(rounds):
        for k in runnable:
            d = _clone(d0)
            _sync(device)
            if device == "cuda":
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                kv.VARIANTS[k].fn(d)
                e.record()
                torch.cuda.synchronize()
                times[k].append(s.elapsed_time(e) / 1e3)
            else:
                t0 = time.perf_counter()
                kv.VARIANTS[k].fn(d)
                times[k].append(time.perf_counter() - t0)
            del d
        log(f"  round {r + 1}/{rounds} ({dtype}): " + ", ".join(f"{k} {times[k][-1]:.3f}s" for k in runnable))
    floor = statistics.median(times["gemm_only"]) if "gemm_only" in times else None
    for k in runnable:
        med, mn = statistics.median(times[k]), min(times[k])
        rows[k].update(median_s=med, min_s=mn, times_s=times[k],
                       x_gemm=(med / floor) if floor else None, min_x_gemm=(mn / min(times["gemm_only"])) if floor else None)
    if mem:
        for k in runnable:
            if device == "cuda":
                rows[k]["peak_extra_gb"] = mem_cuda(kv.VARIANTS[k].fn, d0)
            else:
                gb, err = mem_cpu(k, n, h, v, dtype)
                rows[k]["peak_extra_gb"] = gb
                if err:
                    rows[k]["note"] = err
            log(f"  memory {dtype} {k}: {rows[k].get('peak_extra_gb')}")
    return [rows[k] for k in names]


# ------------------------------------------------------------------------------------------ output
def _f(x, fmt):
    return "–" if x is None else format(x, fmt)


def markdown(rows) -> str:
    lines = ["| dtype | variant | computes | returns entropy | median ms | × GEMM floor | min ms (× floor) "
             "| peak extra GB | notes |", "|---|---|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        ms = None if r.get("median_s") is None else r["median_s"] * 1e3
        mn = "–" if r.get("min_s") is None else f"{r['min_s'] * 1e3:.1f} ({_f(r.get('min_x_gemm'), '.2f')}×)"
        lines.append(f"| {r['dtype']} | {r['variant']} | {r['computes']} | {r['entropy']} | {_f(ms, '.1f')} | "
                     f"{_f(r.get('x_gemm'), '.2f')} | {mn} | {_f(r.get('peak_extra_gb'), '.3f')} | "
                     f"{r.get('note', '')} |")
    return "\n".join(lines)


def target_lines(rows, dtypes) -> list[str]:
    """The issue's CPU targets, read off the rows (meaningful only on a quiet machine), for ours_fused and,
    where it ran, ours_fused_compiled; "every other variant" means the ones that are not ours."""
    ours_names = [n for n, v in kv.VARIANTS.items() if v.ours and n.startswith("ours_fused")]
    out = []
    for dt in dtypes:
        rs = {r["variant"]: r for r in rows if r["dtype"] == dt}
        others = [r for k, r in rs.items() if k != "gemm_only" and not kv.VARIANTS[k].ours and r.get("median_s") is not None]
        for name in ours_names:
            ours = rs.get(name, {})
            if ours.get("median_s") is None:
                if name == "ours_fused":
                    out.append(f"- {dt}: ours_fused did not run")
                continue
            beaten = [r["variant"] for r in others if r["median_s"] <= ours["median_s"]]
            gb = ours.get("peak_extra_gb")
            out.append(f"- {dt}: {name} {_f(ours.get('x_gemm'), '.2f')}× its GEMMs (target <= 1.25); "
                       f"ahead of every other variant that ran: {'yes' if not beaten else 'no, behind ' + ', '.join(beaten)}; "
                       f"peak extra {_f(gb, '.3f')} GB (target <= 0.5)")
    return out


def plot(rows, dtypes, path, title) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["variant"] for r in rows))
    fig, axes = plt.subplots(len(dtypes), 2, figsize=(13, 0.45 * len(names) * len(dtypes) + 2.2), squeeze=False)
    for i, dt in enumerate(dtypes):
        rs = {r["variant"]: r for r in rows if r["dtype"] == dt}
        ypos = list(range(len(names)))[::-1]
        for j, (key, label, scale) in enumerate((("median_s", "median time, fwd + bwd (ms)", 1e3),
                                                 ("peak_extra_gb", "peak extra memory (GB)", 1.0))):
            ax = axes[i][j]
            vals = [rs.get(k, {}).get(key) for k in names]
            colors = ["tab:green" if kv.VARIANTS[k].ours else "tab:gray" if k == "gemm_only" else
                      "tab:blue" if kv.VARIANTS[k].entropy == "yes" else "tab:orange" for k in names]
            ax.barh(ypos, [0 if x is None else x * scale for x in vals], color=colors)
            top = max([x * scale for x in vals if x is not None] or [1.0])
            for y, k, x in zip(ypos, names, vals):
                if x is None:
                    ax.text(0.01 * top, y, "not run" if rs.get(k, {}).get("median_s") is None else "n/a",
                            va="center", fontsize=8, color="dimgray")
                elif key == "median_s" and rs[k].get("x_gemm") is not None:
                    ax.text(x * scale, y, f" {rs[k]['x_gemm']:.2f}×", va="center", fontsize=8)
                else:
                    ax.text(x * scale, y, f" {x * scale:.3g}", va="center", fontsize=8)
            ax.set_yticks(ypos)
            ax.set_yticklabels(names, fontsize=8)
            ax.set_xlim(0, top * 1.25)
            ax.set_xlabel(label)
            ax.set_title(f"{dt}: {label}", fontsize=10)
            ax.grid(axis="x", alpha=0.3)
    fig.suptitle(title + "\ngreen: ours, blue: returns entropy, orange: no entropy, gray: GEMM floor", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ main
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtypes", default=None, help="comma-separated (default: fp32,bf16 on CPU, bf16 on CUDA)")
    p.add_argument("--n", type=int, default=None, help="tokens (a multiple of 8; default 4096 CPU, 8192 CUDA)")
    p.add_argument("--h", type=int, default=None, help="hidden size (default 576 CPU, 4096 CUDA)")
    p.add_argument("--v", type=int, default=None, help="vocabulary (default 49152 CPU, 131072 CUDA)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--variants", default="all", help="comma-separated names from kernel_variants.VARIANTS")
    p.add_argument("--no-mem", action="store_true", help="skip the peak-memory runs")
    p.add_argument("--out", default=None, help="folder for kernels_<device>.{md,json,png} (default bench/results/kernels_<device>)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    cpu = a.device == "cpu"
    n = a.n or (4096 if cpu else 8192)
    h = a.h or (576 if cpu else 4096)
    v = a.v or (49152 if cpu else 131072)
    dtypes = (a.dtypes or ("fp32,bf16" if cpu else "bf16")).split(",")
    if a.child:
        mem_child(a.child, n, h, v, dtypes[0])
        return
    if not cpu and not torch.cuda.is_available():
        sys.exit("no CUDA device")
    names = list(kv.VARIANTS) if a.variants == "all" else a.variants.split(",")
    if "gemm_only" not in names:
        names.insert(0, "gemm_only")
    unknown = [k for k in names if k not in kv.VARIANTS]
    if unknown:
        sys.exit(f"unknown variants {unknown}; known: {list(kv.VARIANTS)}")
    out = a.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"kernels_{a.device}")
    os.makedirs(out, exist_ok=True)
    dev_name = cpu_model() if cpu else torch.cuda.get_device_name()
    head = (f"{a.device}: {dev_name}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
            f"N={n} H={h} V={v}; {a.rounds} rounds")
    print("# " + head, flush=True)
    load_before = loadavg()
    rows = []
    for dt in dtypes:
        rows += run_dtype(names, n, h, v, dt, a.device, a.rounds, mem=not a.no_mem,
                          log=lambda s: print(s, flush=True))
    load_after = loadavg()
    mem_method = ("fresh subprocess per variant, VmHWM − VmRSS around one call after a warm-up" if cpu else
                  "max_memory_allocated − memory_allocated") if not a.no_mem else "not measured (--no-mem)"
    meta = dict(device=a.device, device_name=dev_name, threads=torch.get_num_threads(), torch=torch.__version__,
                n=n, h=h, v=v, rounds=a.rounds, dtypes=dtypes, load_before=load_before, load_after=load_after,
                memory_method=mem_method, refs_dir=kv.REFS_DIR if os.path.isdir(kv.REFS_DIR) else None)
    with open(os.path.join(out, f"kernels_{a.device}.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    table = markdown(rows)
    targets = target_lines(rows, dtypes) if cpu else []
    md = "\n".join([f"{head}; load average {load_before} before, {load_after} after.",
                    f"Peak extra memory: {mem_method} (dX and dW included).", ""]
                   + ([*targets, ""] if targets else []) + [table])
    with open(os.path.join(out, f"kernels_{a.device}.md"), "w") as f:
        f.write(md + "\n")
    png = os.path.join(out, f"kernels_{a.device}.png")
    plot(rows, dtypes, png, head)
    print(f"# wrote {out}/kernels_{a.device}.{{md,json,png}}")
    print(md, flush=True)


if __name__ == "__main__":
    main()
