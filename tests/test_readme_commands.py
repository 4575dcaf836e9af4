"""Every command README.md shows runs here, so that a renamed option, preset, env keyword or script breaks CI
and not a user.

The commands are read from README.md itself: each line of a ```bash block, and each inline code span that
starts with a program (``spear demo``, ``bash scripts/main.sh train ...``). Each one is either run or listed
in :data:`NOT_RUN` with the reason; a command that is neither fails :func:`test_every_readme_command_is_run_or_listed`,
and so does a stale entry of the list.

How each is run:
- ``spear train ...`` (also under ``torchrun``): first exactly as written, through the CLI, up to the
  loaded config (so the README's own model, engine, preset, env and kwargs must validate); then for real,
  in-process, with overrides appended that only shrink it (:data:`SHRINK`: the ``tiny`` random model, one
  step, tiny batches, no SFT warm-up) and swap ``rollout.name=vllm`` for ``hf`` (vLLM on a CPU costs about
  a minute to start; the vLLM engine is tested in ``tests/rollout`` and ``tests/faults/test_fault_engine.py``).
  The two configs may differ only in those keys, so the shrink masks nothing the command sets (its preset,
  env, env.kwargs, backend, ...). A command whose shrunk config equals one already trained in this session
  is loaded, not trained again.
- ``torchrun --nproc_per_node=2 -m spear_engine.cli train ...``: for real, 2 CPU ranks on gloo, shrunk.
- ``spear eval --run-dir runs/<run>`` / ``spear plot runs/<run>``: ``<run>`` is the run folder of the first
  README training command, in this test's working folder; eval with ``--episodes 2`` appended.
- ``bash scripts/main.sh [args]``: the real script, from a copy of the repo layout whose ``setup.sh`` is a
  stand-in (the installs are what the script's other callers, CI included, already ran) and whose ``spear``
  records its arguments; the recorded ``spear`` command is then run as above.
- ``spear presets ...``: as written; ``spear demo`` with ``--steps 2`` appended.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from spear_engine import cli, commands
from spear_engine.config import SpearConfig

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"

PROGRAMS = {"spear", "bash", "sh", "torchrun", "deepspeed", "python", "python3", "pytest", "pip", "sudo", "apt-get"}  # fmt: skip
"""An inline code span whose first word (after VAR=value assignments) is one of these is a command."""

NOT_RUN = {
    "bash scripts/test.sh": "the whole suite (ruff + pytest, this test included): what CI itself runs",
    "pytest tests/faults": "the fault suite; CI runs it as part of the whole suite",
    "OUT=dir bash bench/gpu_check.sh": "needs an NVIDIA GPU (H100 / H200) and CUDA",
    "sudo apt-get install default-jre-headless": "installs a system package as root; setup.sh's message that names "
    "it is tested by test_setup_stops_before_installing_when_java_is_missing",
    "sudo apt-get install build-essential python3-dev python3-venv": "installs system packages as root",
    "spear experiment twc-cpu": "hours on 2 cores; tests/test_experiment.py runs the same runner (warm-up, arms, "
    "resume, extension) on a tiny experiment, and `spear compare results/twc-cpu` reads what this command wrote",
    "spear experiment twc-cpu --seeds 3,4,5 --out results/twc-cpu-test trainer.val_seed_offset=500 "
    "env.kwargs.eval_fold=test": "hours on 2 cores; its overrides are loaded by test_experiment_overrides_in_readme_load",
    "torchrun --nproc_per_node=2 -m spear_engine.cli train --preset paper-alfworld-spear": "two GPUs; the 2-rank "
    "launch is run with the README's other torchrun command; the paper presets load in tests/test_paper_presets.py "
    "and train shrunk (torch backend) in tests/train/test_trajectory_layout.py",
    "spear train --preset paper-alfworld-spear": "a GPU job (Qwen2.5-1.5B, ZeRO-3 in bf16); see the line above",
    "spear eval": "a mention of the subcommand in prose (alone it lacks the required --run-dir); the README's full "
    "`spear eval --run-dir runs/<run> --episodes 32 --greedy` is run",
}  # fmt: skip
"""README commands that are not run, and why. Their scripts and paths are still checked to exist."""

SHRINK = {
    "model.path": "tiny", "env.max_steps": "2", "data.train_batch_size": "2", "env.rollout.n": "2",
    "data.max_response_length": "8", "data.max_prompt_length": "768", "actor.ppo_mini_batch_size": "8",
    "actor.ppo_micro_batch_size_per_gpu": "4", "trainer.total_training_steps": "1", "trainer.sft_warmup_steps": "0",
    "trainer.test_freq": "0", "trainer.val_episodes": "2",
}  # fmt: skip
"""Appended to every training command: sizes only, and the model. Plus ``trainer.run_name`` (a folder per
command) and ``rollout.name=hf`` in place of ``vllm``."""

FILES = {"my.yaml": "inherit: spear\nactor:\n  clip_ratio_high: 0.3\n"}
"""Files README commands name (``--config my.yaml``: "my.yaml may say `inherit: spear` and override keys")."""

RUN = "readme-run"
"""The run folder (under ``runs/``) that stands for ``runs/<run>``."""


# ------------------------------------------------------------------------------------------------
# reading the README
# ------------------------------------------------------------------------------------------------
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```[ \t]*$", re.M | re.S)


def _command_words(span: str) -> list[str] | None:
    """The words of an inline code span when it is a command (a program and at least one argument)."""
    rough = span.split()
    first = next((w for w in rough if not re.fullmatch(r"[A-Za-z_]\w*=\S*", w)), None)
    if first not in PROGRAMS or len(rough) < 2:
        return None
    return shlex.split(span)


def readme_commands(text: str | None = None) -> list[str]:
    """Every command in README.md, in order, once: lines of shell code blocks (comments dropped) and inline
    code spans that start with a program; each normalised with ``shlex.join``."""
    text = README.read_text() if text is None else text
    found: list[str] = []
    for block in FENCE.finditer(text):
        if block.group(1).strip() in ("bash", "sh", "shell", "console"):
            for line in block.group(2).replace("\\\n", " ").splitlines():  # join continued lines
                words = shlex.split(line, comments=True)
                if words:
                    found.append(shlex.join(words))
    prose = FENCE.sub("", text)
    for span in re.findall(r"`([^`\n]+)`", prose):
        words = _command_words(span)
        if words:
            found.append(shlex.join(words))
    return list(dict.fromkeys(found))


def runner_of(command: str) -> str | None:
    """Which runner of this module runs a README command (None: none does)."""
    words = shlex.split(command)
    if words[0] == "spear" and len(words) > 1 and words[1] in ("train", "eval", "plot", "presets", "demo", "compare"):
        return "spear"
    if words[:2] == ["spear", "experiment"] and "--status" in words:  # reads the committed folder, runs nothing
        return "spear"
    if words[:2] == ["bash", "scripts/main.sh"]:
        return "main.sh"
    if (
        words[0] == "torchrun"
        and "-m" in words
        and words[words.index("-m") + 1 :][:2] == ["spear_engine.cli", "train"]
    ):
        return "torchrun"
    return None


COMMANDS = readme_commands()
RUNNABLE = [c for c in COMMANDS if runner_of(c) is not None and c not in NOT_RUN]


# ------------------------------------------------------------------------------------------------
# the working folder: a fresh folder per module, one torch thread, offline
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("readme")
    for name, text in FILES.items():
        (root / name).write_text(text)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core machine: two contending threads make a tiny step ~30x slower
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        mp.chdir(root)
        yield root
    torch.set_num_threads(threads)


def _flat(config: SpearConfig) -> dict[str, Any]:
    def walk(node: Any, prefix: str) -> Iterator[tuple[str, Any]]:
        if isinstance(node, dict) and not prefix.endswith("kwargs."):
            for key, value in node.items():
                yield from walk(value, f"{prefix}{key}.")
        else:
            yield prefix.rstrip("."), node

    return dict(walk(config.model_dump(mode="json"), ""))


@contextlib.contextmanager
def _recorded_configs(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[SpearConfig]]:
    """The configs ``spear train`` loads while inside."""
    seen: list[SpearConfig] = []
    real = commands.load_config

    def record(*args: Any, **kwargs: Any) -> SpearConfig:
        seen.append(real(*args, **kwargs))
        return seen[-1]

    with monkeypatch.context() as mp:
        mp.setattr(commands, "load_config", record)
        yield seen


class _Loaded(Exception):
    """Stops ``spear train`` once its config is loaded (the dry pass)."""


def _loaded_config(monkeypatch: pytest.MonkeyPatch, train_args: list[str], capsys) -> SpearConfig:
    """The config of ``spear train <train_args>``, through the CLI, without building the trainer."""
    import spear_engine.train.trainer as trainer_module

    def stop(*args: Any, **kwargs: Any) -> None:
        raise _Loaded

    with _recorded_configs(monkeypatch) as seen, monkeypatch.context() as mp:
        mp.setattr(trainer_module, "Trainer", stop)
        try:
            code = cli.main(["train", *train_args])
        except _Loaded:
            code = None
    err = capsys.readouterr().err
    assert code is None and len(seen) == 1, (
        f"`spear train {shlex.join(train_args)}` did not load: exit {code}\n{err}"
    )
    return seen[0]


def _shrink(readme: SpearConfig, run_name: str) -> list[str]:
    extra = [f"{key}={value}" for key, value in SHRINK.items()] + [f"trainer.run_name={run_name}"]
    if readme.rollout.name == "vllm":
        extra.append("rollout.name=hf")
    return extra


def _check_nothing_masked(readme: SpearConfig, run: SpearConfig) -> None:
    allowed = {*SHRINK, "trainer.run_name", "rollout.name"}
    a, b = _flat(readme), _flat(run)
    masked = {
        k: (a.get(k), b.get(k)) for k in a.keys() | b.keys() if a.get(k) != b.get(k) and k not in allowed
    }
    assert not masked, f"the test's overrides changed what the README command sets: {masked}"
    assert (
        run.env.name == readme.env.name
        and run.env.kwargs == readme.env.kwargs
        and run.preset == readme.preset
    )


def _run_name(command: str) -> str:
    return "cmd-" + re.sub(r"[^A-Za-z0-9]+", "-", command).strip("-")[:80]


_TRAINED: dict[str, Path] = {}
"""Shrunk config (less its run name) -> the run folder that trained it in this session. A README command whose
shrunk config is one already trained (``spear train`` and ``spear train --preset spear --env alfworld``;
``bash scripts/main.sh`` and ``spear train --preset quickstart``) is loaded through the CLI, not trained again."""


def run_train(args: list[str], run_name: str, monkeypatch: pytest.MonkeyPatch, capsys) -> Path:
    """``spear train <args>``: loaded as written, then run shrunk (stdout is not a terminal, so the progress
    comes as plain lines); returns the run folder."""
    readme = _loaded_config(monkeypatch, args, capsys)
    shrunk = [*args, *_shrink(readme, run_name)]
    planned = _loaded_config(monkeypatch, shrunk, capsys)
    _check_nothing_masked(readme, planned)
    key = json.dumps({k: v for k, v in _flat(planned).items() if k != "trainer.run_name"}, sort_keys=True)
    if key in _TRAINED:
        return _TRAINED[key]
    with _recorded_configs(monkeypatch) as seen:
        code = cli.main(["train", *shrunk])
    out, err = capsys.readouterr()
    assert code == 0, f"exit {code}\n{out[-3000:]}\n{err[-5000:]}"
    assert _flat(seen[0]) == _flat(planned)
    run_dir = Path(planned.trainer.output_dir) / run_name
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 1, records
    assert (run_dir / "curves.png").is_file() and (run_dir / "config.yaml").is_file()
    if "console" in planned.trainer.logger and "--no-progress" not in args:
        line = r"^train step 1/1  success \S+  entropy \S+  .*s/step \S+  elapsed \S+  eta \S+$"
        assert re.search(line, out, re.M), out
    _TRAINED[key] = run_dir
    return run_dir


# ------------------------------------------------------------------------------------------------
# runners
# ------------------------------------------------------------------------------------------------
SUBCOMMAND_SHRINK = {"eval": ["--episodes", "2"], "demo": ["--steps", "2"]}
"""Appended to these subcommands (the last value of an option wins): sizes only."""


def run_spear(words: list[str], command: str, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    sub, args = words[0], words[1:]
    missing = [a for a in args if re.search(r"<[^>]*>", a) and "runs/<run>" not in a]
    assert not missing, f"README placeholder(s) {missing} have no stand-in in this test"
    args = [a.replace("runs/<run>", f"runs/{RUN}") for a in args]
    if "--config" in args:
        name = args[args.index("--config") + 1]
        assert name in FILES, f"`{command}` names the file {name}: add what it should hold to FILES"
    if sub == "train":
        run_train(args, _run_name(command), monkeypatch, capsys)
        return
    if sub == "compare":  # the committed results folder, its outputs written here
        assert args, f"README writes `{command}` without the results folder it compares"
        args = [str(REPO / args[0]), *args[1:], "--out", str(Path.cwd() / "compare")]
    if sub == "experiment":  # --status of the committed results folder
        args = [*args, "--out", str(REPO / "results" / args[0])]
    code = cli.main([sub, *args, *SUBCOMMAND_SHRINK.get(sub, [])])
    out, err = capsys.readouterr()
    assert code == 0, f"exit {code}\n{out[-3000:]}\n{err[-5000:]}"
    if sub == "eval":
        result = json.loads(out[out.index("{") :])
        assert 0.0 <= result["val/success_rate"] <= 1.0 and result["step"] == 1, result
    elif sub == "plot":
        assert Path(out.strip().splitlines()[-1]).is_file(), out
    elif sub == "compare":
        assert all((Path.cwd() / "compare" / f).is_file() for f in ("compare.png", "results.md", "results.json")), out
    elif sub == "experiment":
        assert "seed 0: every run done" in out and "  drbot          done: 16 steps" in out, out
    else:
        assert out.strip(), f"`{command}` printed nothing"


def run_main_sh(args: list[str], command: str, root: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """The real scripts/main.sh in a copy of the repo layout: setup.sh and the venv's `spear` are stand-ins
    that record what main.sh calls them with; the recorded `spear` command is then run."""
    fake = root / "main_sh" / _run_name(command)
    (fake / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "main.sh", fake / "scripts" / "main.sh")
    (fake / "scripts" / "setup.sh").write_text('echo ran >> "$(dirname "$0")/../setup.log"\n')
    venv_bin = fake / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "activate").write_text(f'PATH="{venv_bin}:$PATH"\n')
    spear = venv_bin / "spear"
    spear.write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$(dirname "$0")/../../spear_argv"\n')
    spear.chmod(spear.stat().st_mode | stat.S_IXUSR)
    proc = subprocess.run(["bash", str(fake / "scripts" / "main.sh"), *args], capture_output=True, text=True,
                          timeout=60, cwd=root)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (fake / "setup.log").read_text() == "ran\n", "main.sh did not run setup.sh once"
    argv = (fake / "spear_argv").read_text().splitlines()
    if not args:
        assert argv == ["train", "--preset", "quickstart"], argv  # the README: the default is the quickstart
    else:
        assert argv == args, argv  # extra arguments replace the default
    run_spear(argv, command, monkeypatch, capsys)


def run_torchrun(words: list[str], command: str, root: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """2 CPU ranks (gloo, DeepSpeed's CPU accelerator), shrunk; the README's launcher options are kept. Each
    rank gets 2 prompt groups (one would leave nothing to a rollout_filter_ratio < 1)."""
    at = words.index("-m")
    launcher, train_args = words[1:at], words[at + 3 :]
    readme = _loaded_config(monkeypatch, train_args, capsys)
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert torchrun is not None, "torchrun not found next to the interpreter"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run_name = _run_name(command)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    ranks = int(next((w.split("=")[1] for w in launcher if w.startswith("--nproc_per_node=")), "1"))
    cmd = [torchrun, *launcher, f"--master_port={port}", "-m", "spear_engine.cli", "train", *train_args,
           *_shrink(readme, run_name), f"data.train_batch_size={2 * ranks}"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=420, cwd=root, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    run_dir = Path(readme.trainer.output_dir) / run_name
    config = SpearConfig.model_validate(yaml.safe_load((run_dir / "config.yaml").read_text()))
    _check_nothing_masked(readme, config)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 1, records
    assert len(list((run_dir / "checkpoints").glob("step_*/state_rank1.pt"))) == 1, (
        "the second rank did not save"
    )


# ------------------------------------------------------------------------------------------------
# tests
# ------------------------------------------------------------------------------------------------
def test_the_readme_commands_are_found() -> None:
    heads = {" ".join(shlex.split(c)[:2]) for c in COMMANDS}
    assert heads >= {
        "spear train",
        "spear eval",
        "spear plot",
        "spear presets",
        "spear demo",
        "bash scripts/main.sh",
    }, heads
    assert any(c.startswith("torchrun ") for c in COMMANDS), COMMANDS
    sample = (
        "```bash\nspear x  # note\n```\nthen `spear demo --steps 2`, not `spear-official` or `torchrun`.\n"
    )
    assert readme_commands(sample) == ["spear x", "spear demo --steps 2"]
    assert readme_commands("```bash\nspear train \\\n  --preset grpo  # go\n```\n") == [
        "spear train --preset grpo"
    ]


def test_every_readme_command_is_run_or_listed() -> None:
    neither = [c for c in COMMANDS if runner_of(c) is None and c not in NOT_RUN]
    assert not neither, (
        f"README.md shows command(s) this test neither runs nor lists in NOT_RUN: {neither}. Teach a runner to "
        f"run it (shrunk), or list it in NOT_RUN with the reason."
    )
    stale = [c for c in NOT_RUN if c not in COMMANDS]
    assert not stale, f"NOT_RUN lists command(s) README.md no longer shows: {stale}"


@pytest.mark.parametrize("command", sorted(NOT_RUN))
def test_the_commands_not_run_name_what_exists(command: str) -> None:
    """A command that is not run still names scripts and folders that exist, and its scripts parse."""
    words = shlex.split(command)
    outputs = {words[i + 1] for i, w in enumerate(words[:-1]) if w == "--out"}  # written by the command
    for word in words:
        if "/" in word and not word.startswith(("-", "http")) and "=" not in word and word not in outputs:
            path = REPO / word
            assert path.exists(), f"`{command}` names {word}, which does not exist"
            if path.suffix == ".sh":
                subprocess.run(["bash", "-n", str(path)], check=True)


@pytest.fixture
def readme_run(workdir: Path, monkeypatch, capsys) -> Path:
    """``runs/<run>``: the run folder of the first README training command (tiny, one step)."""
    run = workdir / "runs" / RUN
    if not run.exists():
        first = next(c for c in RUNNABLE if c.startswith("spear train"))
        run.symlink_to(run_train(shlex.split(first)[2:], _run_name(first), monkeypatch, capsys).resolve())
    return run


@pytest.mark.parametrize("command", RUNNABLE)
def test_readme_command_runs(command: str, workdir: Path, monkeypatch, capsys, request) -> None:
    words = shlex.split(command)
    if any("runs/<run>" in w for w in words):
        request.getfixturevalue("readme_run")
    kind = runner_of(command)
    if kind == "spear":
        run_spear(words[1:], command, monkeypatch, capsys)
    elif kind == "main.sh":
        run_main_sh(words[2:], command, workdir, monkeypatch, capsys)
    else:
        run_torchrun(words, command, workdir, monkeypatch, capsys)


def test_setup_stops_before_installing_when_java_is_missing(tmp_path: Path) -> None:
    """scripts/setup.sh, with no `java` on PATH (or a broken one), says how to install it and exits non-zero
    before it creates the venv or installs anything."""
    shutil.copytree(REPO / "scripts", tmp_path / "scripts")
    tools = tmp_path / "bin"
    tools.mkdir()
    for tool in ("dirname", "python3", "pip", "cmp", "cp"):  # what setup.sh would reach for next
        if shutil.which(tool):
            (tools / tool).symlink_to(shutil.which(tool))
    broken = tmp_path / "broken_java"
    broken.mkdir()
    (broken / "java").write_text("#!/bin/sh\nexit 1\n")
    (broken / "java").chmod(0o755)
    for path in (str(tools), f"{broken}:{tools}"):
        proc = subprocess.run(["/bin/bash", str(tmp_path / "scripts" / "setup.sh")], capture_output=True, text=True,
                              timeout=60, env={"PATH": path, "HOME": str(tmp_path)})  # fmt: skip
        assert proc.returncode != 0, proc.stdout + proc.stderr
        assert "apt-get install default-jre-headless" in proc.stderr and "Java 8" in proc.stderr, proc.stderr
        assert not (tmp_path / ".venv").exists() and not proc.stdout, proc.stdout


def test_experiment_overrides_in_readme_load() -> None:
    """The README's experiment commands (too long to run here) name a real experiment and valid overrides."""
    from spear_engine.experiment import arm_config, check_matched, load_experiment, select

    for command in COMMANDS:
        words = shlex.split(command)
        if words[:2] != ["spear", "experiment"]:
            continue
        name, rest = words[2], words[3:]
        overrides = [w for w in rest if "=" in w and not w.startswith("-")]
        seeds = [int(x) for x in rest[rest.index("--seeds") + 1].split(",")] if "--seeds" in rest else None
        spec = select(load_experiment(name), seeds=seeds)
        check_matched(spec, overrides)
        for arm in spec.arms:
            config = arm_config(spec, arm, spec.seeds[0], "model", overrides)
            for override in overrides:
                key, value = override.split("=", 1)
                node: Any = config.model_dump(mode="json")
                for part in key.split("."):
                    node = node[part]
                assert str(node) == value, (command, key, node)
