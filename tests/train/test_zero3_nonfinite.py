"""A ZeRO-3 step with finite losses but non-finite gradients (on one rank) is skipped on every rank with
weights and optimizer state unchanged, and the next step trains. DeepSpeed 0.19 gives this in fp32 by
treating an invalid global gradient norm as an overflow (it runs its fp16 overflow check only under
loss scaling); the backend relies on it, and this test pins it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("deepspeed", reason="deepspeed is not installed")

WORKER = Path(__file__).with_name("zero3_nonfinite_worker.py")


def test_nonfinite_gradients_on_one_rank_skip_the_step_on_every_rank(tmp_path: Path) -> None:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert torchrun is not None, "torchrun not found next to the interpreter"
    out = tmp_path / "verdict.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    cmd = [torchrun, "--nproc_per_node=2", "--master_port", str(29900 + os.getpid() % 90), str(WORKER), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    for rank, verdict in enumerate(json.loads(out.read_text())):
        assert verdict == {
            "first_ok": True, "skipped_ok": False, "weights_unchanged": True, "state_unchanged": True,
            "next_ok": True, "next_moved": True, "finite_after": True,
        }, f"rank {rank}: {verdict}"  # fmt: skip
