"""One CPU process of the ZeRO-3 checkpoint safety test (run by test_checkpoint_safety.py).

Writes a checkpoint with DeepSpeed ZeRO-3 shards (``save_checkpoint`` + the backend's ``write_extra``), reloads
it into a fresh engine (weights-only, through ``read_extra``), then plants a payload that runs
``touch <out>/pwned`` into each shard DeepSpeed reads with ``torch.load`` (model states, optimizer states),
rewrites the manifest with correct checksums, and records what loading it raised. Writes ``<out>/report.json``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch
from checkpoint_tampering import Payload, rewrite_manifest

from spear_engine.models import load_model
from spear_engine.rollout.weight_sync import iter_named_weights
from spear_engine.train.backends import DeepSpeedBackend
from spear_engine.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from spear_engine.train.policy import FusedHeadPolicy


def backend(shift: float) -> DeepSpeedBackend:
    torch.manual_seed(0)
    model, _ = load_model("tiny")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(shift)
    return DeepSpeedBackend(FusedHeadPolicy(model), 1e-3, 0.0, 1.0)


def weights(b: DeepSpeedBackend) -> dict[str, torch.Tensor]:
    return {name: t.clone() for name, t in iter_named_weights(b.hf_model, 64)}


def main(out: Path) -> None:
    saved = backend(0.0)
    folder = save_checkpoint(out / "run", 1, {"global_step": 1}, write_extra=saved.write_extra)
    expected = weights(saved)

    fresh = backend(0.5)  # other initial weights: the load has to bring the saved ones
    before = weights(fresh)
    load_checkpoint(folder)
    fresh.read_extra(folder)
    got = weights(fresh)
    report: dict = {
        "differed_before": any(not torch.equal(expected[k], before[k]) for k in expected),
        "reloaded_equal": expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected),
    }
    report["refused"] = {}
    marker = out / "pwned"
    shards = sorted((folder / "zero" / "shards").glob("*.pt"))
    for kind in ("model_states", "optim_states"):
        (shard,) = [p for p in shards if p.name.endswith(f"{kind}.pt")]
        original = shard.read_bytes()
        content = torch.load(shard, weights_only=False)  # our own file, just written
        content["extra"] = Payload(marker)
        torch.save(content, shard)
        rewrite_manifest(folder)
        load_checkpoint(folder)  # the manifest verifies and the trainer's own state files are fine
        try:
            fresh.read_extra(folder)
            report["refused"][kind] = "NOT REFUSED"
        except CheckpointError as err:
            report["refused"][kind] = str(err)
        shard.write_bytes(original)
    report["marker"] = marker.exists()
    (out / "report.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
