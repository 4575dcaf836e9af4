"""A 2-rank DeepSpeed ZeRO-3 update on CPU reproduces the single-process update on the same data."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("zero3_parity_worker.py")


def _run(cmd: list[str], tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


@pytest.mark.parametrize(("mode", "layout"), [("token-mean", "padded"), ("seq-mean-token-sum-norm", "padded"),
                                             ("token-mean", "packed")])  # fmt: skip
def test_two_rank_zero3_matches_one_process(mode: str, layout: str, tmp_path: Path) -> None:
    """The single process runs padded rows (the oracle); the 2 ranks run ``layout``."""
    pytest.importorskip("deepspeed", reason="deepspeed is not installed")
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert torchrun is not None, "torchrun not found next to the interpreter"
    single, multi = tmp_path / "single.pt", tmp_path / "multi.pt"
    _run([sys.executable, str(WORKER), "torch", mode, str(single)], tmp_path)
    _run([torchrun, "--nproc_per_node=2", "--master_port", str(29000 + os.getpid() % 500), str(WORKER),
          "deepspeed", mode, str(multi), layout], tmp_path)
    a, b = torch.load(single), torch.load(multi)
    assert a["params"].keys() == b["params"].keys()
    for name, grad in a["grads"].items():  # the gradients the optimizer sees are the same
        scale = float(grad.abs().max())
        torch.testing.assert_close(b["grads"][name], grad, rtol=1e-4, atol=1e-5 * scale + 1e-10)
    for name, after in a["params"].items():
        # Adam's first step is ~lr*sign(g): a gradient within float noise of 0 may flip an element, so the
        # bound is 2 lr per element, and nearly every element must agree to float precision
        diff = (b["params"][name] - after).abs()
        assert float(diff.max()) <= 2e-2 + 1e-6, name
        assert float((diff > 2e-6).float().mean()) < 1e-3, name
    moved = sum(float((a["params"][n] - a["before"][n]).abs().max()) for n in a["params"])
    assert moved > 1e-3  # the update really moved the weights (AdamW lr 1e-2)
    # per-micro pg_loss: single = 4 micro-batches; each rank 2, normalised by global counts x dp_size 2
    single_loss = a["metrics"][0]["actor/pg_loss"]
    ranks = [m["actor/pg_loss"] for m in b["metrics"]]
    assert single_loss == pytest.approx(sum(ranks) / 4, rel=1e-4, abs=1e-7)
