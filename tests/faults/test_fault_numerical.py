"""Numerical faults: NaN / inf in log-probs, losses or gradients. The step is skipped and counted; the
model, the optimizer and the replay buffer are exactly as before it (even though the replay draw of the
step had already run); repeated faults stop the run with a clear message and a checkpoint that loads and
equals the last good state."""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from fault_helpers import (
    assert_same_state,
    model_changed,
    nan_forward,
    snapshot,
    state_of_checkpoint,
    tiny_args,
    tiny_config,
)
from replay_rows import admit_winning_rows

from spear_engine.cli import main
from spear_engine.train.checkpoint import latest_checkpoint, load_checkpoint
from spear_engine.train.policy import FusedHeadPolicy
from spear_engine.train.trainer import Trainer, TrainingHalted

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
NAN = float("nan")


@contextlib.contextmanager
def nan_update_log_probs(trainer: Trainer) -> Iterator[None]:
    """The update's (gradient) forward returns NaN log-probs: a NaN loss."""
    original = trainer.learner.forward
    trainer.learner.forward = nan_forward(original)
    try:
        yield
    finally:
        del trainer.learner.forward


@contextlib.contextmanager
def inf_old_log_probs(trainer: Trainer) -> Iterator[None]:
    """The no-gradient forward (old log-probs) returns -inf for the first token of every row: non-finite
    ratios and losses in every mini-batch."""
    original = trainer.learner._token_stats

    def patched(policy, sequences):
        logp, entropy = original(policy, sequences)
        logp = logp.clone()
        logp[:, 0] = -math.inf
        return logp, entropy

    trainer.learner._token_stats = patched
    try:
        yield
    finally:
        del trainer.learner._token_stats


@contextlib.contextmanager
def inf_gradient(trainer: Trainer) -> Iterator[None]:
    """A finite loss whose gradient is inf in one parameter: the backend skips the non-finite norm."""
    param = next(p for p in trainer.backend.hf_model.parameters() if p.requires_grad)
    handle = param.register_hook(lambda grad: grad * math.inf)
    try:
        yield
    finally:
        handle.remove()


FAULTS: dict[str, Callable[[Trainer], contextlib.AbstractContextManager[None]]] = {
    "nan_log_probs": nan_update_log_probs,
    "inf_old_log_probs": inf_old_log_probs,
    "inf_gradient": inf_gradient,
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_non_finite_step_is_skipped_and_changes_nothing(fault: str, tmp_path: Path) -> None:
    # the separate old-log-prob pass is what inf_old_log_probs corrupts: pin it (auto would skip it on-policy)
    trainer = Trainer(tiny_config("spear", tmp_path, 5, "actor.recompute_old_log_prob=always"), console=False)
    try:
        for _ in range(2):
            trainer.train_step()
        admit_winning_rows(trainer.sil, trainer.global_step)  # something for the faulty step to draw
        before = snapshot(trainer)
        with FAULTS[fault](trainer):
            faulty = trainer.train_step()
        after = snapshot(trainer)
        healthy = trainer.train_step()
    finally:
        trainer.close()
    assert faulty["actor/skipped_steps"] >= 1 and faulty["actor/optimizer_steps"] == 0
    assert faulty["trainer/step_skipped"] == 1.0 and faulty["trainer/consecutive_skipped_steps"] == 1.0
    assert faulty["replay/drawn_rows"] > 0  # the draw ran (and moved the index's RNG) before the fault
    assert faulty["replay/admitted_rows"] == 0.0
    assert_same_state(before, after)  # model, optimizer state and replay bytes bit for bit
    assert trainer.global_step == 4 and healthy["trainer/step_skipped"] == 0.0
    assert healthy["actor/optimizer_steps"] > 0 and healthy["trainer/consecutive_skipped_steps"] == 0.0
    assert model_changed(after, snapshot(trainer))


def test_repeated_faults_halt_with_a_clear_message_and_the_last_good_state(tmp_path: Path) -> None:
    config = tiny_config("spear", tmp_path, 8, "trainer.max_consecutive_skipped_steps=2", "trainer.save_freq=1")
    trainer = Trainer(config, console=False)
    good: dict = {}
    step = trainer.train_step

    def faulty_after_two():
        if trainer.global_step < 2:
            metrics = step()
            good["state"] = snapshot(trainer)
            return metrics
        with nan_update_log_probs(trainer):
            return step()

    trainer.train_step = faulty_after_two
    with pytest.raises(TrainingHalted) as halted:
        trainer.fit()
    message = str(halted.value)
    assert "2 training steps in a row were skipped" in message and "Stopped at step 4" in message
    assert str(tmp_path / "run" / "checkpoints") in message and "actor.lr" in message
    folder = latest_checkpoint(tmp_path / "run")
    assert folder is not None and folder.name == "step_00000004"
    assert_same_state(good["state"], state_of_checkpoint(load_checkpoint(folder)))

    resumed = Trainer(tiny_config("spear", tmp_path, 8, "trainer.max_consecutive_skipped_steps=2"), console=False)
    try:
        assert resumed.global_step == 4 and resumed.consecutive_skips == 2
        assert_same_state(good["state"], snapshot(resumed))
        assert resumed.train_step()["trainer/step_skipped"] == 0.0  # a healthy step after the resume trains
    finally:
        resumed.close()


def test_spear_train_halts_with_one_paragraph_and_exit_code_2(tmp_path: Path, monkeypatch) -> None:
    forward = FusedHeadPolicy.forward

    def nan_when_training(self, batch, loss=None):
        if not torch.is_grad_enabled():
            return forward(self, batch)
        if loss is None:
            logp, entropy = forward(self, batch)
            return logp + NAN, entropy
        logp, entropy, out = forward(self, batch, loss)  # the fused loss path
        out.loss = out.loss + NAN
        return logp + NAN, entropy, out

    monkeypatch.setattr(FusedHeadPolicy, "forward", nan_when_training)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["train", "--preset", "grpo", *tiny_args(tmp_path, 5, "trainer.max_consecutive_skipped_steps=2"),
                     "--no-progress"])  # fmt: skip
    text = err.getvalue()
    assert code == 2 and "Traceback" not in text
    paragraph = text[text.index("spear: error:") :].strip()  # after the weight-loading progress bar
    assert paragraph.startswith("spear: error: 2 training steps in a row were skipped") and "\n" not in paragraph
    assert latest_checkpoint(tmp_path / "run").name == "step_00000002"
