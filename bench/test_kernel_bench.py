"""Smoke test of bench/kernel_bench.py: the one command runs at tiny sizes and its table and PNG are complete.

Not part of the test run (testpaths = tests). Run explicitly (about 2-3 minutes on 2 busy cores, most of it
torch.compile and one fresh process per variant for the memory column):
    python -m pytest bench/test_kernel_bench.py -q
Nothing here depends on timing: it checks that every registered variant has a row with numbers or a reason
it did not run, that the variants that need only torch ran, and that the PNG and JSON were written.
"""

import json
import os
import re
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))
import kernel_variants as kv

BENCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernel_bench.py")
TORCH_ONLY = ["gemm_only", "ours_fused", "ours_fused_compiled", "ours_generic", "naive", "compile"]  # need nothing but torch
NUM = re.compile(r"^\d+(\.\d+)?$")


def _rows(md: str) -> dict[str, list[str]]:
    rows = {}
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| fp32 |"):
            rows[cells[1]] = cells
    return rows


def test_kernel_bench_cpu_tiny(tmp_path):
    out = tmp_path / "kb"
    r = subprocess.run(
        [sys.executable, BENCH, "--device", "cpu", "--dtypes", "fp32", "--n", "64", "--h", "32", "--v", "256",
         "--rounds", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=1200,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    # the table is printed last
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("| fp32 | ") and last.split("|")[2].strip() == list(kv.VARIANTS)[-1]
    md = (out / "kernels_cpu.md").read_text()
    assert md.strip() in r.stdout
    rows = _rows(md)
    assert set(rows) == set(kv.VARIANTS), (set(kv.VARIANTS) ^ set(rows))
    for name, cells in rows.items():
        _, _, _computes, entropy, median_ms, x_gemm, _min, peak_gb, note = cells
        assert entropy in ("yes", "no", "n/a") and entropy == kv.VARIANTS[name].entropy
        if NUM.match(median_ms):  # it ran: every number is there, and no note
            assert NUM.match(x_gemm) and NUM.match(peak_gb), cells
            assert note == "", cells
        else:  # it did not run: a reason, never a bare gap or a crash
            assert median_ms == "–" and note.startswith(("not run on cpu: ", "not installed: ")), cells
            assert len(note) > len("not run on cpu: ") + 10, cells
    for name in TORCH_ONLY:
        assert NUM.match(rows[name][4]), rows[name]
    assert rows["gemm_only"][5] == "1.00"
    # GPU-only kernels are listed as not run on CPU, with their reason (or as not installed)
    for name in ("liger_flsce_cute", "liger_flce", "cce", "verl_triton"):
        assert rows[name][8].startswith(("not run on cpu: ", "not installed: ")), rows[name]
    data = json.loads((out / "kernels_cpu.json").read_text())
    assert {r["variant"] for r in data["rows"]} == set(kv.VARIANTS)
    assert data["meta"]["device"] == "cpu" and data["meta"]["n"] == 64
    png = (out / "kernels_cpu.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def _ref_grads(d0, entropy: bool):
    import torch

    d = {k: t.detach().clone() for k, t in d0.items()}
    x, w = d["x"].requires_grad_(), d["w"].requires_grad_()
    logits = (x @ w.t()).float()
    logp = torch.log_softmax(logits, -1).gather(-1, d["y"].unsqueeze(-1)).squeeze(-1)
    ent = torch.logsumexp(logits, -1) - (torch.softmax(logits, -1) * logits).sum(-1)
    kv.ppo_loss(logp, ent if entropy else None, d["old"], d["adv"], d["mask"]).backward()
    return x.grad, w.grad


def test_variants_compute_what_they_say():
    """Every variant that runs on CPU gives the reference dX, dW (fp32, tiny): with the entropy term where its
    row says it returns entropy, without it where not (the term moves the gradients by ~6e-5 here, so the
    1e-5 tolerance tells the two apart). Catches a mis-wired reference (sign of the NLL, wrong flag)."""
    import torch

    kv.add_refs_to_path()
    d0 = kv.make_inputs(64, 32, 256, torch.float32)
    refs = {True: _ref_grads(d0, True), False: _ref_grads(d0, False)}
    ran = []
    for name, v in kv.VARIANTS.items():
        if name in ("gemm_only", "compile"):  # no loss at all / the naive graph, compiled (slow, covered above)
            continue
        try:
            gx, gw = v.fn({k: t.detach().clone() for k, t in d0.items()})
        except (kv.NotRunnable, ImportError):
            continue
        rx, rw = refs[v.entropy == "yes"]
        for g, r in ((gx, rx), (gw, rw)):
            err = ((g.float() - r).abs().max() / r.abs().max()).item()
            assert err < 1e-5, (name, err)
        ran.append(name)
    assert {"ours_fused", "ours_fused_compiled", "ours_generic", "naive"} <= set(ran)


def test_verl_kernel_module_loads_by_path():
    """verl's linear_cross_entropy loads from a --no-deps install without verl's heavy __init__."""
    import importlib.util

    import pytest

    kv.add_refs_to_path()
    if importlib.util.find_spec("verl") is None:
        pytest.skip("verl not installed (bash bench/kernel_refs.sh)")
    lce = kv.load_verl_lce()
    assert callable(lce) and lce.__self__.__name__ == "LinearCrossEntropy"
