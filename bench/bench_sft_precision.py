"""The quickstart's SFT warm-up in fp32 weights vs bf16 weights (fp32 master copies): time, and how well each
learned, as the NLL per token of every SFT row scored in fp32 with each run's final (fp32 master) weights.

    python bench/bench_sft_precision.py

Why: ``model.dtype=bfloat16`` makes a step faster but trains on bf16 activations and gradients; this measures
what that costs the quickstart's short warm-up (bench/RESULTS.md, session 13).
"""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from spear_engine.config_loading import load_config
from spear_engine.machine import cpu_model
from spear_engine.train.sft import demonstration_rows
from spear_engine.train.trainer import Trainer


def quickstart(dtype: str) -> Trainer:
    overrides = [f"trainer.output_dir={tempfile.mkdtemp(prefix='spear-sft-')}", "trainer.logger=[jsonl]",
                 "rollout.name=hf", f"model.dtype={dtype}"]  # fmt: skip
    return Trainer(load_config("quickstart", overrides), console=False)


def sft_nll(trainer: Trainer, weights: dict[str, torch.Tensor] | None) -> float:
    """NLL per response token of every winning gold episode the warm-up trains on, with ``weights`` (None:
    the trainer's own) in the trainer's (fp32) model."""
    if weights is not None:
        trainer.backend.load_weights(weights)
    tc, loop = trainer.config.trainer, trainer.agent_loop
    rows, mask = demonstration_rows(trainer.tokenizer, loop.env_factory, trainer.config.env.name, loop.config,
                                    tc.sft_episodes, trainer.pad_token_id, trainer.sft_seed)  # fmt: skip
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(mask), 4):
            idx = torch.arange(start, min(start + 4, len(mask)))
            logp, _ = trainer.backend.forward(rows.select(idx))
            total += float(-(logp * mask[idx]).sum())
    return total / float(mask.sum())


def main() -> None:
    final, seconds = {}, {}
    for dtype in ("float32", "bfloat16"):
        trainer = quickstart(dtype)
        metrics = trainer.warmup()
        seconds[dtype] = metrics["time/sft"]
        final[dtype] = {k: v.float().clone() for k, v in trainer.backend.state_dict()["model"].items()}
        trainer.close()
    scorer = quickstart("float32")
    start = sft_nll(scorer, None)
    print(f"{cpu_model()}, {torch.get_num_threads()} threads; quickstart SFT warm-up "
          f"({scorer.config.trainer.sft_warmup_steps} steps); NLL per token in fp32, before: {start:.4f}")  # fmt: skip
    print(f"{'weights':<10}{'SFT s':>8}{'NLL after':>11}")
    for dtype, weights in final.items():
        print(f"{dtype:<10}{seconds[dtype]:>8.1f}{sft_nll(scorer, weights):>11.4f}")
    scorer.close()


if __name__ == "__main__":
    main()
