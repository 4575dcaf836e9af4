"""Bad input: every config error, bad CLI argument, missing model, unknown environment or preset, bad
run folder or checkpoint gives one paragraph naming the problem and the fix, exit status 2, and no stack
trace; ``--debug`` shows the trace, and a bug (not a user error) keeps its trace."""

from __future__ import annotations

import contextlib
import io
import shutil
import subprocess
from pathlib import Path

import pytest
from fault_helpers import child_env, python, tiny_args

from spear_engine.cli import main
from spear_engine.config_loading import ConfigError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def run_cli(args: list[str]) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args)
    return code, err.getvalue()


def paragraph(stderr: str) -> str:
    """The error report (after any model-loading progress bar)."""
    starts = [stderr.find(m) for m in ("usage:", "spear: error:") if m in stderr]
    assert starts, stderr
    return stderr[min(starts) :].strip()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Bad config files, a trained run folder (one step) and damaged copies of it."""
    root = tmp_path_factory.mktemp("bad_input")
    made = {
        "bad_yaml": "actor: [1\n",
        "list_yaml": "- 1\n- 2\n",
        "unknown_key": "actor:\n  lrr: 1\n",
        "unknown_parent": "inherit: nothere\n",
        "bad_json": "{not json",
    }
    paths = {}
    for name, text in made.items():
        path = root / (f"{name}.json" if name == "bad_json" else f"{name}.yaml")
        path.write_text(text)
        paths[name] = path
    (root / "no_config_model").mkdir()
    paths["no_config_model"] = root / "no_config_model"
    code, err = run_cli(["train", "--preset", "grpo", *tiny_args(root, 1), "--no-progress"])
    assert code == 0, err
    run = root / "run"
    paths["run"] = run
    damaged = root / "damaged_config"
    shutil.copytree(run, damaged)
    (damaged / "config.yaml").write_text("x: [\n")
    paths["damaged_config"] = damaged
    corrupt = root / "corrupt_checkpoint"
    shutil.copytree(run, corrupt)
    state = next((corrupt / "checkpoints").iterdir()) / "state_rank0.pt"
    data = bytearray(state.read_bytes())
    data[-50] ^= 0xFF
    state.write_bytes(bytes(data))
    paths["corrupt_checkpoint"] = corrupt
    untrained = root / "untrained"
    shutil.copytree(run, untrained, ignore=shutil.ignore_patterns("checkpoints"))
    paths["untrained"] = untrained
    return paths


TINY_TRAIN = ["train", "model.path=tiny", "trainer.logger=[jsonl]"]
# (id, arguments with {name} placeholders for `files`, fragments of the paragraph: the problem and the fix)
CASES = [
    ("unknown_preset", ["train", "--preset", "grpoo"], ["unknown preset 'grpoo'", "Did you mean 'grpo'"]),
    ("unknown_preset_shown", ["presets", "nope"], ["unknown preset 'nope'", "Known presets:"]),
    ("unknown_key", ["train", "actor.lrr=1"], ["unknown config key 'actor.lrr'", "Did you mean 'actor.lr'"]),
    ("not_a_number", ["train", "actor.lr=abc"], ["'actor.lr' has the value 'abc'", "valid number"]),
    ("out_of_range", ["train", "actor.lr=-1"], ["'actor.lr' has the value -1", "greater than 0"]),
    ("not_allowed", ["train", "model.dtype=float16"], ["'model.dtype' has the value 'float16'",
                                                      "allowed values: 'float32', 'bfloat16'"]),
    ("bad_timeout", ["train", "env.step_timeout_s=0"], ["'env.step_timeout_s' has the value 0", "greater than 0"]),
    ("cross_field", ["train", "rollout.rollout_filter_ratio=0.1", "data.train_batch_size=2"],
     ["keeps no group of data.train_batch_size=2", "raise one of them"]),
    ("not_key_value", ["train", "actor.clip_ratio_high"], ["is not of the form key=value",
                                                          "for example actor.clip_ratio_high=0.28"]),
    ("override_yaml", ["train", "actor.lr=[1"], ["'actor.lr=[1': the value is not valid YAML", "quote it"]),
    ("missing_config", ["train", "--config", "/nonexistent/my.yaml"], ["'/nonexistent/my.yaml' does not exist",
                                                                      "spear presets spear"]),
    ("config_yaml", ["train", "--config", "{bad_yaml}"], ["not valid YAML", "line 2, column 1", "fix the file"]),
    ("config_list", ["train", "--config", "{list_yaml}"], ["top level must be a mapping of sections, got list"]),
    ("config_unknown_key", ["train", "--config", "{unknown_key}"], ["unknown config key 'actor.lrr'",
                                                                   "Did you mean 'actor.lr'"]),
    ("config_unknown_parent", ["train", "--config", "{unknown_parent}"], ["unknown preset 'nothere'",
                                                                         "Known presets"]),
    ("unknown_env", [*TINY_TRAIN, "--env", "nowhere"], ["unknown environment 'nowhere'",
                                                       "available: alfworld, "]),
    ("bad_env_kwargs", [*TINY_TRAIN, "env.name=webshop", "env.kwargs={{bogus: 1}}"],
     ["unexpected keyword argument 'bogus'", "Fix env.name or env.kwargs"]),
    ("missing_model", ["train", "model.path=/nonexistent/model"], ["model path /nonexistent/model does not exist",
                                                                  "pass an existing folder"]),
    ("model_without_config", ["train", "model.path={no_config_model}"], ["has no config.json"]),
    ("uncached_hub_model", ["train", "model.path=some-org/not-cached-model"],
     ["'some-org/not-cached-model' is not in the HF cache", "download it"]),
    ("resume_missing", [*TINY_TRAIN, "env.name=webshop", "trainer.resume=/nonexistent/step_1"],
     ["no such checkpoint folder", "auto"]),
    ("resume_none_over_a_run", [*TINY_TRAIN, "env.name=faulty_lucky", "--run-dir", "{run}", "trainer.resume=none"],
     ["already has checkpoints", "trainer.resume=auto"]),
    ("eval_no_run", ["eval", "--run-dir", "/nonexistent/run"], ["is not a run folder of `spear train`"]),
    ("eval_damaged_config", ["eval", "--run-dir", "{damaged_config}"], ["config.yaml is damaged", "restore it"]),
    ("eval_corrupt_checkpoint", ["eval", "--run-dir", "{corrupt_checkpoint}", "--checkpoint",
                                 "{corrupt_checkpoint}/checkpoints/step_00000001"],
     ["fails its SHA-256 checksum (corrupted)", "Use another checkpoint"]),
    ("eval_untrained", ["eval", "--run-dir", "{untrained}"], ["has no valid checkpoint to evaluate", "train it first"]),
    ("plot_missing", ["plot", "/nonexistent/run"], ["has no metrics to plot"]),
    ("demo_steps", ["demo", "--steps", "0"], ["--steps must be at least 1, got 0"]),
    ("demo_missing_batch", ["demo", "--batch", "/nonexistent/batch.json"], ["no such file", "leave --batch out"]),
    ("demo_bad_batch", ["demo", "--batch", "{bad_json}"], ["is not a recording of episodes", "leave --batch out"]),
    ("no_command", [], ["no command given", "spear --help"]),
    ("unknown_command", ["bogus"], ["invalid choice: 'bogus'", "usage: spear"]),
    ("unknown_option", ["train", "--bogus"], ["unrecognized arguments: --bogus", "usage: spear"]),
    ("bad_option_value", ["eval", "--run-dir", "x", "--episodes", "many"], ["invalid int value: 'many'", "usage:"]),
    ("missing_option", ["eval"], ["the following arguments are required: --run-dir", "usage:"]),
]  # fmt: skip


@pytest.mark.parametrize(("args", "fragments"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_user_error_is_one_paragraph_with_exit_code_2(args: list[str], fragments: list[str], files) -> None:
    code, stderr = run_cli([a.format(**files) for a in args])
    report = paragraph(stderr)
    assert code == 2, stderr
    assert "Traceback" not in stderr, stderr
    assert "\n\n" not in report and not any(line.strip() == "" for line in report.splitlines()), report
    for fragment in fragments:
        assert fragment in report, (fragment, report)


def test_debug_raises_the_user_error_with_its_trace() -> None:
    with pytest.raises(ConfigError, match="unknown preset 'grpoo'"):
        main(["--debug", "train", "--preset", "grpoo"])


def test_a_bug_keeps_its_stack_trace(monkeypatch) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("an engine bug")

    monkeypatch.setattr("spear_engine.commands.run_train", broken)
    with pytest.raises(RuntimeError, match="an engine bug"):
        main(["train"])


def test_the_spear_process_exits_2_without_a_trace_and_1_with_one_under_debug() -> None:
    command = [python(), "-m", "spear_engine.cli"]
    plain = subprocess.run([*command, "train", "--preset", "grpoo"], env=child_env(), capture_output=True,
                           text=True, timeout=120)  # fmt: skip
    debug = subprocess.run([*command, "--debug", "train", "--preset", "grpoo"], env=child_env(), capture_output=True,
                           text=True, timeout=120)  # fmt: skip
    assert plain.returncode == 2 and "Traceback" not in plain.stderr and "Did you mean 'grpo'" in plain.stderr
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr
    assert "ConfigError: unknown preset 'grpoo'" in debug.stderr
