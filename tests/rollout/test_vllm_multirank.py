"""One in-process vLLM engine per rank under torchrun (2 CPU ranks, gloo, DeepSpeed ZeRO-3): each engine
lives in vLLM's own world of size 1, generates for its rank's prompts without any collective, and is
synced from the ZeRO-3 partitions bucket by bucket; the trainer's group keeps working. The worker is
``vllm_multirank_worker.py``; its ranks start up in both orders (rank 1 makes the trainer's group first,
as the trainer does, rank 0 its engine first). Then end to end: ``spear train`` on 2 ranks with
DeepSpeed ZeRO-3 and ``rollout.name=vllm`` (SFT warm-up, then RL steps, each followed by a per-rank
sync)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

TOL_LOGP = 1e-3
TRAIN_ARGS = [
    "--preset", "spear", "trainer.backend=deepspeed", "rollout.name=vllm", "model.path=tiny",
    "env.name=webshop", "env.max_steps=6", "data.train_batch_size=2", "env.rollout.n=2",
    "data.max_response_length=8", "data.max_prompt_length=768", "actor.ppo_mini_batch_size=8",
    "actor.ppo_micro_batch_size_per_gpu=2", "trainer.logger=[jsonl]", "trainer.test_freq=0",
    "trainer.save_freq=0", "rollout.rollout_filter_ratio=1.0", "trainer.run_name=run",
    "algorithm.filter_incomplete_responses=false", "algorithm.filter_overlong_responses=false",
    "trainer.sft_warmup_steps=2", "trainer.sft_episodes=2", "trainer.sft_rows_per_step=2",
    "trainer.total_training_steps=2",
]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun(*args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={_free_port()}",
        *args,
    ]


ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


@pytest.mark.slow
def test_one_vllm_engine_per_rank(vllm_available, tiny_path, tmp_path):
    out = tmp_path / "result.json"
    worker = Path(__file__).with_name("vllm_multirank_worker.py")
    proc = subprocess.run(
        _torchrun(str(worker), tiny_path, str(out)), env=ENV, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    results = json.loads(out.read_text())
    assert [(r["rank"], r["engine_first"]) for r in results] == [(0, True), (1, False)]
    for r in results:
        assert r["world"] == 2 and r["vllm_world"] == 1 and r["vllm_tp"] == 1, r  # vLLM's own size-1 world
        assert r["all_reduce"] == r["all_reduce_end"] == 3.0, r  # the trainer's group spans both ranks
        assert r["partitioned"], r  # really ZeRO-3 partitioned across the ranks
        assert r["gap_initial"] < TOL_LOGP and r["argmax_initial"], r
        assert r["gap_stale"] > 0.05, r  # the update changed the model, the engine was stale
        assert r["changed"] and r["gap_synced"] < TOL_LOGP and r["argmax_synced"], r
    build, sync = [r["build_s"] for r in results], [r["sync_s"] for r in results]
    gap = max(r["gap_synced"] for r in results)
    print(
        f"per rank: build {build[0]:.1f}/{build[1]:.1f} s, sync {sync[0]:.2f}/{sync[1]:.2f} s, gap {gap:.1e}"
    )


@pytest.mark.slow
def test_two_rank_deepspeed_training_with_vllm_rollouts(vllm_available, tmp_path):
    """The SFT warm-up changes the weights a lot and each step's update a little; after every sync rank 0's
    rollout log-probs (from its vLLM engine) match the trainer's on the same tokens (without the syncs the
    gap is ~0.09)."""
    cmd = _torchrun("-m", "spear_engine.cli", "train", *TRAIN_ARGS, f"trainer.output_dir={tmp_path}")
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2] and rows[0]["sft/nll"] > 0
    for r in rows[1:]:
        assert r["mismatch/abs_log_ratio_mean"] < TOL_LOGP and r["mismatch/max_ratio"] < 1.01, r
