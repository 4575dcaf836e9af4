"""Shared pieces of the fault tests: an environment with injectable faults, a scripted rollout engine, the
tiny-model configs, state snapshots and comparisons, child-process plumbing.

Importable from child processes too (``PYTHONPATH`` from :func:`child_env`), so a killed training child
and the test that resumes it use the same environment.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
import sys
import threading
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch

from spear_engine.config_loading import load_config
from spear_engine.envs.base import Action, Observation, StepResult, register_env
from spear_engine.rollout.engine import Generation, SamplingParams

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent

# ------------------------------------------------------------------------------------------------
# an environment with injectable faults
# ------------------------------------------------------------------------------------------------
FAULTS: dict[tuple[str, int, int], list[Any]] = {}
"""(split, seed, call) -> [fault, times left]; call 0 is ``reset``, call k the k-th ``step``."""
_LOCK = threading.Lock()
_RELEASE = threading.Event()
HANG_S = 60.0
"""A hung call waits this long at most (or until :func:`reset_faults` releases it)."""


def inject(split: str, seed: int, call: int, fault: str, times: int = 1) -> None:
    """Make the env call ``call`` (0 = reset) of the next ``times`` episodes with this seed and split fail
    with ``fault``: raise, hang, not_a_result, nan_reward, inf_reward, bad_flag, bad_observation (reset:
    raise, hang, malformed). The episodes of a group share their seed."""
    with _LOCK:
        FAULTS[(split, seed, call)] = [fault, times]


def reset_faults() -> None:
    """Forget pending faults and release every hung call (abandoned threads then finish)."""
    global _RELEASE
    with _LOCK:
        FAULTS.clear()
        _RELEASE.set()
        _RELEASE = threading.Event()
        FaultyLuckyEnv.created.clear()


def _hang() -> None:
    _RELEASE.wait(HANG_S)


@register_env("faulty_lucky")
class FaultyLuckyEnv:
    """The trainer tests' two-step lucky game (reward from a hash of the sampled text, so a random policy
    gets a mix of successes and failures), plus the faults of :data:`FAULTS`. The task names the seed
    (``#<seed>``) so a scripted engine can tell episodes apart."""

    name = "faulty_lucky"
    created: ClassVar[list[FaultyLuckyEnv]] = []

    def __init__(self, max_steps: int = 2) -> None:
        self.max_steps, self.t, self.seed, self.split = max_steps, 0, 0, "train"
        self.closed = False
        FaultyLuckyEnv.created.append(self)

    def _fault(self, call: int) -> str | None:
        with _LOCK:
            planned = FAULTS.get((self.split, self.seed, call))
            if planned is None:
                return None
            planned[1] -= 1
            if planned[1] <= 0:
                del FAULTS[(self.split, self.seed, call)]
            return planned[0]

    def _observation(self) -> Observation:
        return Observation(f"room {(self.seed + self.t) % 7}", task=f"say something lucky #{self.seed}",
                           admissible_actions=["a", "b"])  # fmt: skip

    def reset(self, seed: int, split: str = "train") -> Observation:
        self.t, self.seed, self.split = 0, seed, split
        fault = self._fault(0)
        if fault == "raise":
            raise RuntimeError(f"injected reset fault (seed {seed})")
        if fault == "hang":
            _hang()
        if fault == "malformed":
            return f"room {seed}"  # type: ignore[return-value]
        return self._observation()

    def step(self, action: Action) -> StepResult:
        self.t += 1
        fault = self._fault(self.t)
        if fault == "raise":
            raise ValueError(f"injected step fault (seed {self.seed})")
        if fault == "hang":
            _hang()
        lucky = zlib.crc32(f"{self.seed}:{action.text}".encode()) % 3 == 0
        done = lucky or self.t >= self.max_steps
        result = StepResult(self._observation(), 10.0 if lucky else 0.0, done, lucky, action.kind == "command")
        malformed: dict[str, Any] = {
            "not_a_result": {"observation": result.observation.text, "reward": result.reward},
            "nan_reward": dataclasses.replace(result, reward=float("nan")),
            "inf_reward": dataclasses.replace(result, reward=float("inf")),
            "bad_flag": dataclasses.replace(result, done="yes"),
            "bad_observation": dataclasses.replace(result, observation=result.observation.text),
        }
        return malformed.get(fault, result) if fault else result

    def gold_actions(self) -> list[Action]:
        return []

    def close(self) -> None:
        self.closed = True


# ------------------------------------------------------------------------------------------------
# a scripted rollout engine
# ------------------------------------------------------------------------------------------------
Reply = Callable[[str], list[int]]
"""prompt text -> the token ids to return."""


def seed_of(prompt_text: str) -> int:
    """The episode seed a FaultyLuckyEnv prompt names (``#<seed>``)."""
    return int(re.findall(r"#(\d+)", prompt_text)[-1])


class ScriptedEngine:
    """Answers every prompt with ``reply(prompt text)``, cut at ``max_new_tokens`` (then ``finish_reason``
    ``length``), with log-prob -0.5 per token."""

    name = "scripted"

    def __init__(self, tokenizer: Any, reply: Reply | None = None) -> None:
        self.tokenizer = tokenizer
        self.reply = reply or (lambda text: self.encode("<action>a</action>", eos=True))
        self.calls = 0

    def encode(self, text: str, eos: bool = True) -> list[int]:
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return [*ids, self.tokenizer.eos_token_id] if eos else ids

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Generation]:
        self.calls += 1
        out = []
        for prompt in prompts:
            ids = self.reply(self.tokenizer.decode(prompt))[: params.max_new_tokens]
            finish = "length" if len(ids) >= params.max_new_tokens else "stop"
            out.append(Generation(ids, [-0.5] * len(ids), finish))
        return out

    def load_weights(self, named_tensors: Any) -> None:
        for _ in named_tensors:
            pass

    def close(self) -> None:
        pass


# ------------------------------------------------------------------------------------------------
# the tiny-model trainer configs
# ------------------------------------------------------------------------------------------------
TINY = [
    "model.path=tiny", "env.name=faulty_lucky", "env.max_steps=2", "data.train_batch_size=2", "env.rollout.n=3",
    "data.max_response_length=12", "data.max_prompt_length=768", "actor.ppo_mini_batch_size=8",
    "actor.ppo_micro_batch_size_per_gpu=4", "trainer.logger=[jsonl]", "trainer.test_freq=0", "actor.lr=0.01",
    "trainer.val_episodes=2", "algorithm.filter_incomplete_responses=false",
    "algorithm.filter_overlong_responses=false", "rollout.rollout_filter_ratio=1.0", "replay.trajectory_buffer_size=8",
    "trainer.deterministic=true",
]  # fmt: skip


def tiny_args(out_dir: str | Path, steps: int, *extra: str) -> list[str]:
    return [*TINY, f"trainer.total_training_steps={steps}", f"trainer.output_dir={out_dir}", "trainer.run_name=run",
            *extra]  # fmt: skip


def tiny_config(preset: str, out_dir: str | Path, steps: int, *extra: str):
    return load_config(preset, tiny_args(out_dir, steps, *extra))


# ------------------------------------------------------------------------------------------------
# state snapshots
# ------------------------------------------------------------------------------------------------
def snapshot(trainer: Any) -> dict[str, Any]:
    """Model weights, optimizer state and replay buffer bytes of a trainer, copied."""
    return {
        "model": {k: v.detach().clone() for k, v in trainer.backend.hf_model.state_dict().items()},
        "optimizer": copy.deepcopy(trainer.backend.optimizer.state_dict()),
        "replay": copy.deepcopy(trainer.sil.state_dict()) if trainer.sil is not None else None,
    }


def state_of_checkpoint(state: dict[str, Any]) -> dict[str, Any]:
    """The same three parts from a loaded checkpoint state."""
    return {"model": state["backend"]["model"], "optimizer": state["backend"]["optimizer"], "replay": state["replay"]}


def _assert_equal_nested(a: Any, b: Any, path: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype, path
        assert torch.equal(a, b), f"{path} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{path}: keys differ"
        for k in a:
            _assert_equal_nested(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{path}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal_nested(x, y, f"{path}[{i}]")
    elif a != b:
        detail = f"{len(a)} vs {len(b)} bytes" if isinstance(a, bytes) and isinstance(b, bytes) else f"{a!r} != {b!r}"
        raise AssertionError(f"{path} differs: {detail[:300]}")


def assert_same_state(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Bit-exact equality of two snapshots (model, optimizer, replay bytes)."""
    _assert_equal_nested(a, b, "state")


def model_changed(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return any(not torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


# ------------------------------------------------------------------------------------------------
# processes
# ------------------------------------------------------------------------------------------------
def child_env(**extra: str) -> dict[str, str]:
    """Environment of a child process: offline, one thread, the repo and this folder importable."""
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                "PYTHONPATH": os.pathsep.join([str(REPO), str(HERE), env.get("PYTHONPATH", "")])})  # fmt: skip
    env.update(extra)
    return env


def python() -> str:
    return sys.executable


def rss_mb() -> float:
    """This process's resident set size (VmRSS), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


# ------------------------------------------------------------------------------------------------
# checkpoint writers to kill (run in child processes)
# ------------------------------------------------------------------------------------------------
def checkpoint_content(step: int, floats: int = 1_000_000) -> dict[str, Any]:
    """A checkpoint state that is a function of its step (so a loaded one can be checked exactly)."""
    import hashlib

    generator = torch.Generator().manual_seed(step)
    return {"step": step, "weights": torch.randn(floats, generator=generator),
            "replay": hashlib.sha256(str(step).encode()).digest() * 2048}  # fmt: skip


def save_forever(run_dir: str, first_step: int, keep_last: int, started: Any = None) -> None:
    """Save checkpoints first_step, first_step + 1, ... until killed (``started``: an Event set first)."""
    from spear_engine.train.checkpoint import save_checkpoint

    if started is not None:
        started.set()
    step = first_step
    while True:
        save_checkpoint(run_dir, step, checkpoint_content(step), keep_last=keep_last)
        step += 1


def save_and_die_before(run_dir: str, step: int, keep_last: int, kill_before: int) -> None:
    """Save one checkpoint, SIGKILLing this process just before its ``kill_before``-th file-system operation
    (mkdir, safetensors save_file, torch.save, write_text, fsync, rename, rmtree); exits normally if the save
    has fewer."""
    import shutil
    import signal

    import safetensors.torch

    from spear_engine.train.checkpoint import save_checkpoint

    count = [0]

    def killing(fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            count[0] += 1
            if count[0] == kill_before:
                os.kill(os.getpid(), signal.SIGKILL)
            return fn(*args, **kwargs)

        return call

    os.mkdir, os.fsync, os.rename = killing(os.mkdir), killing(os.fsync), killing(os.rename)
    shutil.rmtree, torch.save = killing(shutil.rmtree), killing(torch.save)
    safetensors.torch.save_file = killing(safetensors.torch.save_file)
    Path.write_text = killing(Path.write_text)  # type: ignore[method-assign]
    save_checkpoint(run_dir, step, checkpoint_content(step, floats=1000), keep_last=keep_last)


def nan_forward(forward: Any) -> Any:
    """A training forward (``Trainer._forward``) whose log-probs, and loss on the fused path, are NaN: the
    micro-batch loss is NaN whether the update takes the fused loss or the torch loss."""
    nan = float("nan")

    def patched(idx: Any, rows: Any, loss: Any = None) -> Any:
        if loss is None:
            log_probs, entropy = forward(idx, rows)
            return log_probs + nan, entropy
        log_probs, entropy, out = forward(idx, rows, loss)
        out.loss = out.loss + nan
        return log_probs + nan, entropy, out

    return patched
