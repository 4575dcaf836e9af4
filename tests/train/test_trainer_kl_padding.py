"""The trainer with ``algorithm.use_kl_in_reward`` (reference model built without ``actor.use_kl_loss``, the
KL metrics of verl) and ``data.pad_batch_by_duplication`` (seeded copies: a resumed run pads as the
uninterrupted one), on the tiny model."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "faults"))

from fault_helpers import tiny_config

from spear_engine.train.trainer import Trainer

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("one_torch_thread")]

EXTRA = ["algorithm.use_kl_in_reward=true", "algorithm.kl_coef=0.5", "algorithm.kl_penalty=k3",
         "data.pad_batch_by_duplication=true"]  # fmt: skip


def _comparable(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not k.startswith(("time/", "perf/", "share/"))}


def test_kl_in_reward_and_padding_in_the_trainer_and_on_resume(tmp_path: Path) -> None:
    trainer = Trainer(tiny_config("grpo", tmp_path / "a", 2, *EXTRA), console=False)
    assert trainer.ref_policy is not None and not trainer.config.actor.use_kl_loss
    straight = trainer.fit()
    first, second = straight
    assert first["actor/reward_kl_penalty"] == pytest.approx(
        0.0, abs=1e-6
    )  # the policy is still the reference
    assert second["actor/reward_kl_penalty"] > 0  # one update later it is not
    assert first["actor/reward_kl_penalty_coeff"] == second["actor/reward_kl_penalty_coeff"] == 0.5
    # rows: 2 groups x 3 episodes x <= 2 steps, padded to a multiple of lcm(micro 4, mini 8) = 8
    assert all(0 < m["rollout/duplicated_rows"] < 8 for m in straight)
    Trainer(tiny_config("grpo", tmp_path / "b", 1, *EXTRA), console=False).fit()
    resumed = Trainer(tiny_config("grpo", tmp_path / "b", 2, *EXTRA), console=False).fit()
    assert _comparable(resumed[0]) == _comparable(second)
    off = Trainer(tiny_config("grpo", tmp_path / "c", 1), console=False)
    assert off.ref_policy is None
    off.close()


def test_evaluation_runs_val_batch_size_episodes_at_a_time(tmp_path: Path) -> None:
    trainer = Trainer(tiny_config("grpo", tmp_path, 1, "data.val_batch_size=2", "trainer.val_episodes=5"),
                      console=False)  # fmt: skip
    calls = []
    run = trainer.agent_loop.run

    def spy(seeds, group_size, params, split="train"):
        calls.append((list(seeds), params.seed))
        return run(seeds, group_size, params, split=split)

    trainer.agent_loop.run = spy
    try:
        result = trainer.evaluate()
    finally:
        trainer.close()
    assert [seeds for seeds, _ in calls] == [[0, 1], [2, 3], [4]]
    assert len({seed for _, seed in calls}) == 3  # each block samples with its own seed
    assert result["val/count"] == 5.0
