"""The console progress sink: a rich bar on an interactive terminal; one plain, complete line per step when the
output is a pipe, a file, ``nohup`` or a CI log (where a live bar comes out cut: ``train ━━━━ 3/3 0:… eta 0:0…``)."""

from __future__ import annotations

import io
import re

import pytest
import torch
from rich.console import Console

from spear_engine import cli
from spear_engine.metrics import ConsoleProgress, PlainProgress, build_logger, console_progress

STEP_LINE = re.compile(
    r"^train step (\d+)/(\d+)  success (\S+)  entropy (\S+)(?:  buffer (\S+))?(?:  mfu \S+  pad eff \S+(?:  prefix share \S+x)?)?  s/step (\S+)  "
    r"elapsed \d+:\d\d:\d\d  eta (\d+):(\d\d):(\d\d)$"
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def step_metrics(step: int) -> dict[str, float]:
    return {"episode/success_rate": step / 4, "rollout/entropy": 1.5 - step / 10, "trajectory_sft_buffersize": 3.0 * step,
            "time/step": 10.0, "actor/pg_loss": 0.1}  # fmt: skip


def test_not_a_terminal_gives_one_full_line_per_step(tmp_path, capsys) -> None:
    logger = build_logger(["jsonl", "console"], tmp_path, total_steps=3, resume_step=None)
    sink = logger.sinks[-1]
    assert isinstance(sink, PlainProgress)  # pytest's captured stdout is not a terminal
    clock = FakeClock()
    sink._clock, sink._origin = clock, clock.now
    for step in (1, 2, 3):
        clock.now += 10.0
        logger.log(step, step_metrics(step))
    logger.close()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3, lines
    for step, line in enumerate(lines, 1):
        match = STEP_LINE.match(line)
        assert match, line  # whole, on one line, never cut to 80 columns
        assert (int(match[1]), int(match[2])) == (step, 3)
        assert (
            match[3] == f"{step / 4:.2f}"
            and match[4] == f"{1.5 - step / 10:.3f}"
            and match[5] == f"{3 * step}"
        )
        assert match[6] == "10.0"
        eta = int(match[7]) * 3600 + int(match[8]) * 60 + int(match[9])
        assert eta == 10 * (3 - step)  # mean measured time per step x steps left
    assert len(lines[0]) > 80


def test_plain_lines_for_the_sft_warm_up_and_a_missing_field() -> None:
    out, clock = io.StringIO(), FakeClock()
    sink = PlainProgress(2, file=out, status_interval_s=10.0, clock=clock)
    sink.status("SFT warm-up: playing 24 gold episodes")
    for k in range(1, 7):  # one status per SFT optimizer step, 4 s apart: a line every few of them
        clock.now += 4.0
        sink.status(f"SFT warm-up {k}/6  nll {2.0 / k:.3f}")
    sink.log(0, {"sft/nll": 0.333, "sft/grad_norm": 1.0, "time/sft": 24.0})  # the warm-up, logged as step 0
    clock.now += 7.0
    sink.log(
        1, {"episode/success_rate": 0.5, "time/step": 7.0}
    )  # GRPO: no replay buffer; no entropy reported
    lines = out.getvalue().splitlines()
    assert (
        lines
        == [
            "train: SFT warm-up: playing 24 gold episodes",
            "train: SFT warm-up 3/6  nll 0.667",
            "train: SFT warm-up 6/6  nll 0.333",
            "train SFT warm-up done  nll 0.333  time 0:00:24",
            "train step 1/2  success 0.50  entropy -  s/step 7.0  elapsed 0:00:07  eta 0:00:07",  # SFT not in the ETA
        ]
    )


@pytest.mark.parametrize("force_interactive", [True, None])
def test_a_terminal_still_gets_the_rich_bar(force_interactive, monkeypatch) -> None:
    monkeypatch.setenv("TERM", "xterm-256color")
    for name in ("TTY_INTERACTIVE", "TTY_COMPATIBLE", "FORCE_COLOR", "NO_COLOR"):
        monkeypatch.delenv(name, raising=False)
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, force_interactive=force_interactive, width=150)
    sink = console_progress(3, console=console)
    assert isinstance(sink, ConsoleProgress)
    sink.status("SFT warm-up 1/6")
    sink.log(1, step_metrics(1))
    sink.close()
    text = out.getvalue()
    assert "━" in text and "1/3" in text and "success 0.25" in text
    assert "\x1b[" in text  # drawn with terminal control codes, not as plain lines
    assert STEP_LINE.search(text) is None


def test_a_training_run_with_stdout_not_a_terminal_prints_one_line_per_step(
    tmp_path, monkeypatch, capsys
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = cli.main([
            "train", "--preset", "spear", "--env", "math", "model.path=tiny", "env.max_steps=2", "env.rollout.n=2",
            "data.train_batch_size=2", "data.max_response_length=8", "data.max_prompt_length=768",
            "actor.ppo_mini_batch_size=8", "actor.ppo_micro_batch_size_per_gpu=4", "trainer.total_training_steps=3",
            "trainer.test_freq=0", "trainer.save_freq=0", f"trainer.output_dir={tmp_path}", "trainer.run_name=run",
            "trainer.logger=[jsonl,console]",
        ])  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert code == 0, out
    steps = [STEP_LINE.match(line) for line in out.splitlines() if line.startswith("train step")]
    assert [(int(m[1]), int(m[2])) for m in steps if m] == [(1, 3), (2, 3), (3, 3)], out
    assert all(m[5] is not None for m in steps), out  # spear: the replay buffer size is on every line
    assert "━" not in out and "\x1b[" not in out
