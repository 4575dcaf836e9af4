"""The trainer under DeepSpeed ZeRO-3 on 2 CPU ranks (torchrun, gloo), through the `spear` CLI: the SFT
warm-up, training with checkpoints, and a resume from a ZeRO-3 checkpoint that reproduces the
uninterrupted run step for step."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("deepspeed", reason="deepspeed is not installed")

ARGS = [
    "--preset", "spear", "trainer.backend=deepspeed", "model.path=tiny", "env.name=webshop", "env.max_steps=6",
    "data.train_batch_size=2", "env.rollout.n=2", "data.max_response_length=8", "data.max_prompt_length=768",
    "actor.ppo_mini_batch_size=8", "actor.ppo_micro_batch_size_per_gpu=2", "trainer.logger=[jsonl]",
    "trainer.test_freq=0", "trainer.save_freq=1", "rollout.rollout_filter_ratio=1.0", "trainer.run_name=run",
    "algorithm.filter_incomplete_responses=false", "algorithm.filter_overlong_responses=false",
    "trainer.sft_warmup_steps=2", "trainer.sft_episodes=2", "trainer.sft_rows_per_step=2", "trainer.deterministic=true",
]  # fmt: skip


def _train(out: Path, steps: int, port: int) -> None:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert torchrun is not None, "torchrun not found next to the interpreter"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    cmd = [torchrun, "--nproc_per_node=2", "--master_port", str(port), "-m", "spear_engine.cli", "train", *ARGS,
           f"trainer.total_training_steps={steps}", f"trainer.output_dir={out}"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=out.parent)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def _records(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "perf/", "share/"))} for r in rows]


def test_zero3_warmup_train_and_resume_match_an_uninterrupted_run(tmp_path: Path) -> None:
    """Three steps straight (a ZeRO-3 checkpoint after each), then a copy of that run cut back to step 2 (its
    step-3 checkpoint and metrics record removed: the files a run stopped after step 2 leaves) resumed to step 3.
    Two launches instead of three; a resume that ran nothing would leave steps [0, 1, 2] and fail."""
    port = 29500 + os.getpid() % 400
    straight, resumed_run = tmp_path / "straight", tmp_path / "resumed"
    straight.mkdir()
    resumed_run.mkdir()
    _train(straight, 3, port)
    shutil.copytree(straight / "run", resumed_run / "run")
    checkpoints = resumed_run / "run" / "checkpoints"
    assert {p.name for p in (checkpoints / "step_00000002").iterdir()} >= {
        "manifest.json", "state_rank0.pt", "state_rank1.pt", "zero"
    }  # fmt: skip
    shutil.rmtree(checkpoints / "step_00000003")
    metrics = resumed_run / "run" / "metrics.jsonl"  # and its step-3 record: what a run stopped at step 2 leaves
    kept = [line for line in metrics.read_text().splitlines() if json.loads(line)["step"] <= 2]
    metrics.write_text("".join(line + "\n" for line in kept))
    _train(resumed_run, 3, port + 1)  # resumes from step 2's ZeRO-3 checkpoint, the newest left
    resumed, reference = _records(resumed_run), _records(straight)
    assert [r["step"] for r in resumed] == [0, 1, 2, 3]  # the warm-up (step 0) ran once, every step logged once
    assert resumed[0]["sft/nll"] > 0
    assert resumed == reference  # same losses, grad norms, entropies, replay counters at every step
