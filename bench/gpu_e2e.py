"""End-to-end GPU check of the trainer: three training steps of the ``spear`` preset on CUDA.

For each rollout engine that runs here (HF always; vLLM when it imports), a trainer with
``trainer.device=cuda`` takes three steps with a small model, and the check asserts that the model sits
on the GPU, every step trained (finite losses, optimizer steps taken) and reports step time, MFU and
peak GPU memory. Written without a GPU at hand: the first session with one runs it (bench/gpu_check.sh).

    python bench/gpu_e2e.py --out $OUT [--model tiny] [--engines hf,vllm] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch


def run_engine(engine: str, args: argparse.Namespace) -> dict[str, object]:
    from spear_engine.config_loading import load_config
    from spear_engine.train.trainer import Trainer

    out = tempfile.mkdtemp(prefix=f"spear-gpu-{engine}-")
    overrides = [
        f"model.path={args.model}", f"model.dtype={args.dtype}", "env.name=webshop", "env.max_steps=3",
        "data.train_batch_size=4", "env.rollout.n=4", "data.max_response_length=48", f"trainer.device={args.device}",
        f"rollout.name={engine}", "trainer.logger=[jsonl]", "trainer.test_freq=0", "trainer.save_freq=0",
        f"trainer.total_training_steps={args.steps}", f"trainer.output_dir={out}", "trainer.run_name=gpu",
        "rollout.gpu_memory_utilization=0.3", *args.override,
    ]  # fmt: skip
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer = Trainer(load_config("spear", overrides), console=False)
    try:
        device = next(trainer.backend.hf_model.parameters()).device
        assert device.type == args.device, f"the model is on {device}, not on {args.device}"
        steps = []
        for _ in range(args.steps):
            start = time.perf_counter()
            metrics = trainer.train_step()
            if cuda:
                torch.cuda.synchronize()
            metrics["wall_s"] = time.perf_counter() - start
            steps.append(metrics)
        for k, m in enumerate(steps):
            assert m.get("actor/optimizer_steps", 0) > 0, f"step {k + 1} took no optimizer step: {m}"
            assert math.isfinite(m.get("actor/pg_loss", float("nan"))), f"step {k + 1}: pg_loss {m.get('actor/pg_loss')}"
        later = steps[1:] or steps
        return {
            "engine": engine, "ok": True, "model": args.model, "dtype": args.dtype,
            "step_s": statistics.median(m["time/step"] for m in later),
            "rollout_s": statistics.median(m["time/rollout"] for m in later),
            "update_s": statistics.median(m["time/update"] for m in later),
            "mfu": statistics.median(m.get("perf/mfu", 0.0) for m in later),
            "update_mfu": statistics.median(m.get("perf/update_mfu", 0.0) for m in later),
            "padding_efficiency": statistics.median(m.get("perf/padding_efficiency", 0.0) for m in later),
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"),
        }  # fmt: skip
    finally:
        trainer.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=".")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--engines", default="hf,vllm")
    parser.add_argument("--device", default="cuda", help="cpu: a smoke run of this script without a GPU")
    parser.add_argument("override", nargs="*")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_e2e: no CUDA device; nothing to check")
        return 1
    from spear_engine.rollout.engine import resolve_engine_name

    rows, status = [], 0
    for engine in args.engines.split(","):
        if engine == "vllm" and resolve_engine_name("auto") != "vllm":
            rows.append({"engine": engine, "ok": None, "why": "vLLM does not import here"})
            continue
        try:
            rows.append(run_engine(engine, args))
        except Exception as err:  # report and go on with the next engine
            traceback.print_exc()
            rows.append({"engine": engine, "ok": False, "why": f"{type(err).__name__}: {err}"[:300]})
            status = 1
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "gpu_e2e.json").write_text(json.dumps(rows, indent=1))
    card = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    lines = [f"end-to-end, {card}: spear preset, {args.steps} steps, model {args.model}",
             "| engine | ok | step s | rollout s | update s | MFU | update MFU | pad eff | peak GiB |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        if r.get("ok"):
            lines.append(f"| {r['engine']} | yes | {r['step_s']:.2f} | {r['rollout_s']:.2f} | {r['update_s']:.2f} | "
                         f"{r['mfu']:.3f} | {r['update_mfu']:.3f} | {r['padding_efficiency']:.2f} | {r['peak_gib']:.2f} |")  # fmt: skip
        else:
            lines.append(f"| {r['engine']} | {'skipped' if r['ok'] is None else 'FAIL'} | {r.get('why', '')} |")
    text = "\n".join(lines)
    (Path(args.out) / "gpu_e2e.md").write_text(text + "\n")
    print(text)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
