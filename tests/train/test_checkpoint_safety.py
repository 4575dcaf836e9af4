"""A checkpoint from elsewhere cannot run code: tensors are stored as safetensors and the rest is read with
``torch.load(weights_only=True)``, so a state file that pickles a call (``os.system``, ``exec``) is refused with
a clear ``CheckpointError`` even when its manifest checksums are right, and the call never runs; the old
pickled format is refused without being unpickled; DeepSpeed's ZeRO-3 shards load weights-only too. And the
new format round-trips: tensors bit for bit, plain data with its types, RNG states that draw the same."""

from __future__ import annotations

import json
import os
import pickle
import random
import subprocess
import sys
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from checkpoint_tampering import Payload, rewrite_manifest

from spear_engine.train.checkpoint import (
    FORMAT_VERSION,
    MANIFEST,
    CheckpointError,
    capture_rng_state,
    list_checkpoints,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
    state_file,
    tensor_file,
)

WORKER = Path(__file__).with_name("zero3_checkpoint_safety_worker.py")


class Tied(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(11, 6)
        self.norm = torch.nn.LayerNorm(6)
        self.head = torch.nn.Linear(6, 11, bias=False)
        self.head.weight = self.embed.weight  # tied: one storage under two names


def trained_state() -> tuple[Tied, torch.optim.Optimizer, dict[str, Any]]:
    torch.manual_seed(3)
    model = Tied()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95))
    for _ in range(2):
        model.head(model.norm(model.embed(torch.tensor([1, 2, 3])))).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    wide = torch.arange(24, dtype=torch.float64).reshape(4, 6)
    state = {
        "global_step": 7,
        "consecutive_skips": 0,
        "config": {"trainer": {"seed": 1, "logger": ["jsonl"], "lr": 1e-6, "none": None, "flag": True}},
        "backend": {"model": model.state_dict(), "optimizer": optimizer.state_dict()},
        "replay": {"index": bytes(range(256)) * 3, "mean_window": b"", "std_window": b"\x00\x01"},
        "rng": capture_rng_state(),
        "world_size": 1,
        "odd": {
            "view": wide[:, 1::2],  # non-contiguous view of a larger storage
            "same_twice": [wide, wide],  # one tensor referenced twice
            "bf16": torch.randn(3, 5).to(torch.bfloat16),
            "scalar": torch.tensor(2.5),
            "empty": torch.empty(0, 4),
            "bools": torch.tensor([True, False]),
            "array": np.arange(12, dtype=np.int16).reshape(3, 4)[:, ::2],
            "int_keys": {0: (1, 2.0, "three", None), 5: [b"x", bytearray(b"y")]},
            "nan": float("nan"),
            "dtype": torch.float16,
            "size": torch.Size([2, 3]),
        },
    }
    return model, optimizer, state


def assert_identical(a: Any, b: Any, path: str = "state") -> None:
    """Equal values of the same types, tensors bit for bit (dtype, shape, bytes)."""
    assert type(a) is type(b), f"{path}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert a.flatten().contiguous().view(torch.uint8).equal(b.flatten().contiguous().view(torch.uint8)), path
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), path
    elif isinstance(a, dict):
        assert list(a) == list(b), f"{path}: keys differ"
        assert getattr(a, "_metadata", None) == getattr(b, "_metadata", None), f"{path}: _metadata differs"
        for k in a:
            assert_identical(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{path}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and a != a:
        assert b != b, path
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def test_save_then_load_gives_identical_state_and_the_same_random_draws(tmp_path: Path) -> None:
    model, optimizer, state = trained_state()
    folder = save_checkpoint(tmp_path / "run", 7, state)
    assert sorted(p.name for p in folder.iterdir()) == sorted([MANIFEST, tensor_file(0), state_file(0)])
    assert json.loads((folder / MANIFEST).read_text())["format"] == FORMAT_VERSION == 2
    loaded = load_checkpoint(folder)
    assert_identical(state, loaded)
    assert isinstance(loaded["backend"]["model"], OrderedDict)  # with the module versions (_metadata)

    # the weights and optimizer state restore into fresh objects and the next step is the same
    fresh = Tied()
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1.0)
    fresh.load_state_dict(loaded["backend"]["model"])
    fresh_optimizer.load_state_dict(loaded["backend"]["optimizer"])
    for m, opt in ((model, optimizer), (fresh, fresh_optimizer)):
        m.head(m.norm(m.embed(torch.tensor([4, 5])))).sum().backward()
        opt.step()
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name

    # every generator restores: the draws after the restore are the draws after the capture
    restore_rng_state(state["rng"])
    expected = (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist())
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    restore_rng_state(loaded["rng"])
    assert (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist()) == expected


def test_a_state_that_is_not_plain_data_fails_at_save_time(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"checkpoint state /extra/hook: a builtins.function cannot be saved"):
        save_checkpoint(tmp_path / "run", 1, {"extra": {"hook": lambda: None}})
    assert list_checkpoints(tmp_path / "run") == []


def _assert_refused_and_not_run(folder: Path, marker: Path, rank: int = 0, match: str = "") -> str:
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(folder, rank)
    assert not marker.exists(), "the malicious pickle ran"
    text = str(error.value)
    assert match in text, text
    return text


@pytest.mark.parametrize("kind", ["os.system", "exec"])
@pytest.mark.parametrize("where", ["top", "nested_in_optimizer", "in_rng_state"])
def test_a_state_file_that_pickles_a_call_is_refused_and_the_call_never_runs(
    tmp_path: Path, kind: str, where: str
) -> None:
    folder = save_checkpoint(tmp_path / "run", 3, trained_state()[2])
    marker = tmp_path / "pwned"
    # the state file as an attacker writes it: the real skeleton with a payload somewhere inside
    skeleton = torch.load(folder / state_file(0), weights_only=True)
    if where == "top":
        skeleton = Payload(marker, kind)
    elif where == "nested_in_optimizer":
        skeleton["backend"]["optimizer"]["param_groups"][0]["lr"] = Payload(marker, kind)
    else:
        skeleton["rng"]["python"] = (3, Payload(marker, kind), None)
    torch.save(skeleton, folder / state_file(0))
    rewrite_manifest(folder)  # checksums all correct

    text = _assert_refused_and_not_run(folder, marker)
    assert str(folder / state_file(0)) in text and "never unpickles arbitrary objects" in text
    assert f"it pickles {'posix.system' if kind == 'os.system' else 'builtins.exec'})" in text  # what it refused
    assert "safe_globals" not in text  # no advice to allow-list the payload

    # the payload is live: a full unpickle would have run it
    live = tmp_path / "live"
    torch.save(Payload(live, kind), tmp_path / "payload.pt")
    torch.load(tmp_path / "payload.pt", weights_only=False)
    assert live.exists()


def test_a_payload_in_the_second_ranks_state_file_is_refused_too(tmp_path: Path) -> None:
    run, state = tmp_path / "run", trained_state()[2]
    barrier = threading.Barrier(2)
    ranks = [threading.Thread(target=save_checkpoint, args=(run, 3, state), kwargs={"rank": r, "barrier": barrier.wait})
             for r in (0, 1)]  # fmt: skip
    for thread in ranks:
        thread.start()
    for thread in ranks:
        thread.join()
    folder = list_checkpoints(run)[-1]
    assert load_checkpoint(folder, 1)["global_step"] == 7
    marker = tmp_path / "pwned"
    torch.save({"global_step": Payload(marker, "os.system")}, folder / state_file(1))
    rewrite_manifest(folder)
    load_checkpoint(folder, 0)  # rank 0's files are fine
    _assert_refused_and_not_run(folder, marker, rank=1, match=state_file(1))


def test_a_tampered_tensor_file_is_refused(tmp_path: Path) -> None:
    folder = save_checkpoint(tmp_path / "run", 3, trained_state()[2])
    (folder / tensor_file(0)).write_bytes(b"\xff" * 8 + b"{not a header")
    rewrite_manifest(folder)
    with pytest.raises(CheckpointError, match="is not a valid safetensors file"):
        load_checkpoint(folder)


def test_a_state_file_left_out_of_the_manifest_is_refused(tmp_path: Path) -> None:
    folder = save_checkpoint(tmp_path / "run", 3, trained_state()[2])
    manifest = json.loads((folder / MANIFEST).read_text())
    del manifest["files"][state_file(0)]
    (folder / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"not covered by its manifest\.json"):
        load_checkpoint(folder)


@pytest.mark.parametrize("version", [1, None])
def test_an_old_format_checkpoint_is_refused_without_being_unpickled(tmp_path: Path, version: int | None) -> None:
    folder = tmp_path / "run" / "checkpoints" / "step_00000005"
    folder.mkdir(parents=True)
    marker = tmp_path / "pwned"
    torch.save({"global_step": 5, "hook": Payload(marker, "os.system")}, folder / "state_rank0.pt")  # format 1
    (folder / MANIFEST).write_text(json.dumps({"step": 5, "files": {}} | ({"format": version} if version else {})))
    rewrite_manifest(folder)
    text = _assert_refused_and_not_run(folder, marker, match="old format")
    assert str(folder) in text and "can run arbitrary code" in text and "was not unpickled" in text


def test_a_checkpoint_of_a_newer_format_asks_for_an_upgrade(tmp_path: Path) -> None:
    folder = save_checkpoint(tmp_path / "run", 3, trained_state()[2])
    manifest = json.loads((folder / MANIFEST).read_text())
    (folder / MANIFEST).write_text(json.dumps(manifest | {"format": FORMAT_VERSION + 1}))
    with pytest.raises(CheckpointError, match="upgrade spear_engine"):
        load_checkpoint(folder)


def test_the_zero3_load_forces_every_torch_load_weights_only(tmp_path: Path) -> None:
    """DeepSpeed's own loader asks for weights_only=False; inside the backend's load it gets weights-only anyway."""
    from spear_engine.train.backends import _forced_weights_only_load

    marker = tmp_path / "pwned"
    torch.save(Payload(marker, "os.system"), tmp_path / "shard.pt")
    before = dict(os.environ)
    with _forced_weights_only_load(), pytest.raises(pickle.UnpicklingError):
        torch.load(tmp_path / "shard.pt", weights_only=False)
    assert not marker.exists() and dict(os.environ) == before


@pytest.mark.slow
def test_zero3_shards_load_weights_only_and_a_payload_in_either_shard_is_refused(tmp_path: Path) -> None:
    """One CPU process: a ZeRO-3 checkpoint reloads into a fresh engine; a payload planted in the model-states
    or the optimizer-states shard (manifest rewritten) raises CheckpointError and never runs."""
    pytest.importorskip("deepspeed", reason="deepspeed is not installed")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "MASTER_PORT": str(28000 + os.getpid() % 900)}  # fmt: skip
    proc = subprocess.run([sys.executable, str(WORKER), str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["differed_before"] is True and report["reloaded_equal"] is True
    assert sorted(report["refused"]) == ["model_states", "optim_states"]
    for shard, message in report["refused"].items():
        assert "refused" in message and ("posix.system" in message or "system" in message), (shard, message)
    assert not (tmp_path / "pwned").exists()
