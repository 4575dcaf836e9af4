"""pytest-benchmark suite: chunked torch path vs naive torch at SmolLM2 shapes (N=4096, H=576, V=49152).

Not part of the test run (testpaths = tests). Run explicitly:
    python -m pytest bench/test_cpu_bench.py --benchmark-enable --benchmark-columns=median,min,max
Each case also records the peak extra memory of one call, measured in a fresh subprocess
(ru_maxrss delta, see cpu_bench.py), in the benchmark's extra_info. For the one-process, round-robin
comparison of all variants (what bench/RESULTS.md reports) use ``python bench/cpu_bench.py``.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import cpu_bench

SHAPE = dict(n=int(os.environ.get("BENCH_N", 4096)), h=576, v=49152)
CASES = ["gemm_only", "ours_fused", "ours_generic", "naive"]


def _peak_gb(name: str, dtype: str) -> float | None:
    r = subprocess.run(
        [sys.executable, cpu_bench.__file__, "--child", name, "--n", str(SHAPE["n"]), "--h", str(SHAPE["h"]),
         "--v", str(SHAPE["v"]), "--dtype", dtype],
        capture_output=True, text=True,
    )
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    return json.loads(lines[-1])["extra_gb"] if lines else None


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("name", CASES)
def test_fwd_bwd(benchmark, name, dtype):
    d0 = cpu_bench.make_inputs(SHAPE["n"], SHAPE["h"], SHAPE["v"], cpu_bench.DT[dtype])

    def setup():
        return ({k: v.detach().clone() for k, v in d0.items()},), {}

    benchmark.extra_info["peak_extra_gb"] = _peak_gb(name, dtype)
    benchmark.pedantic(cpu_bench.VARIANTS[name], setup=setup, rounds=3, iterations=1, warmup_rounds=1)
    assert torch.isfinite(d0["x"]).all()
