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
from kernel_variants import (
    DT,
    add_refs_to_path,
    compiled,
    gemm_only,
    make_inputs,
    naive,
    ours_fused,
    ours_generic,
)
from kernel_variants import liger_grpo as liger

# The variant functions live in kernel_variants.py, shared with kernel_bench.py (every reference in one table
# and a PNG) and gpu_bench.py; this script keeps its CLI and its variant names.
add_refs_to_path()  # liger-kernel from bench/kernel_refs.sh, when installed there

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
