"""The cold-start SFT warm-up: demonstrations are exact agent-loop tokens, the NLL falls, and the
trainer runs it once before RL with the RL learning rate and fresh optimizer moments afterwards."""

from __future__ import annotations

from pathlib import Path

import pytest

from spear_engine.config_loading import load_config
from spear_engine.envs.base import Action, Observation, StepResult, register_env
from spear_engine.metrics import read_metrics
from spear_engine.rollout.agent_loop import AgentLoopConfig
from spear_engine.rollout.engine import SamplingParams
from spear_engine.rollout.gold import GoldPathEngine, render_action
from spear_engine.rollout.parsing import parse_action
from spear_engine.train.sft import demonstrations, sft_warmup
from spear_engine.train.trainer import Trainer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@register_env("corridor")
class CorridorEnv:
    """Walk ``length`` rooms east; any other command wastes a step. Gold path: ``go east`` × length."""

    name = "corridor"

    def __init__(self, max_steps: int = 4, length: int = 2) -> None:
        self.max_steps, self.length = max_steps, length

    def reset(self, seed: int, split: str = "train") -> Observation:
        self.t, self.pos = 0, 0
        return self._observation()

    def _observation(self) -> Observation:
        return Observation(f"You are in room {self.pos}.", task="reach the last room",
                           admissible_actions=["go east", "look"])  # fmt: skip

    def step(self, action: Action) -> StepResult:
        self.t += 1
        self.pos += action.text == "go east"
        won = self.pos >= self.length
        return StepResult(self._observation(), 10.0 if won else 0.0, won or self.t >= self.max_steps, won,
                          action.kind == "command")  # fmt: skip

    def gold_actions(self) -> list[Action]:
        return [Action("command", "go east")] * (self.length - self.pos)

    def close(self) -> None:
        pass


@register_env("no_gold")
class NoGoldEnv(CorridorEnv):
    name = "no_gold"

    def gold_actions(self) -> list[Action]:
        return []


BASE = [
    "model.path=tiny", "env.max_steps=4", "data.train_batch_size=2", "env.rollout.n=2",
    "data.max_response_length=16", "data.max_prompt_length=768", "actor.ppo_mini_batch_size=4",
    "actor.ppo_micro_batch_size_per_gpu=4", "trainer.logger=[jsonl]", "trainer.test_freq=0", "actor.lr=0.003",
    "rollout.rollout_filter_ratio=1.0", "trainer.sft_episodes=4", "trainer.sft_rows_per_step=4",
    "trainer.sft_lr=0.02", "trainer.run_name=run",
]  # fmt: skip


def _trainer(tmp_path: Path, *extra: str) -> Trainer:
    config = load_config("spear", [*BASE, "env.name=corridor", f"trainer.output_dir={tmp_path}", *extra])
    return Trainer(config, console=False)


@pytest.mark.parametrize("layout", ["step", "trajectory"])
def test_demonstration_tokens_are_the_rendered_gold_actions(layout: str, tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, "trainer.total_training_steps=1")
    chat = trainer.agent_loop.chat
    config = AgentLoopConfig(layout=layout, history_length=2, max_turns=4, max_prompt_length=768)
    episodes = demonstrations(chat.tokenizer, lambda: CorridorEnv(length=3), "corridor", config, seeds=[5, 6])
    assert len(episodes) == 2 and all(e.success and e.meta["demonstration"] for e in episodes)
    episode = episodes[0]
    assert len(episode.turns) == 3
    for turn in episode.turns:
        assert turn.response_ids[-1] == chat.eos_id
        assert chat.tokenizer.decode(turn.response_ids[:-1]) == render_action(Action("command", "go east"))
        assert "<action>go east</action>" in turn.response_text
    assert "room 0" in chat.tokenizer.decode(episode.turns[0].prompt_ids)
    second = chat.tokenizer.decode(episode.turns[1].prompt_ids)
    assert "room 1" in second
    if layout == "trajectory":  # later turns are the delta after the previous eos, not a fresh prompt
        assert "room 0" not in second
        assert len(episode.turns[1].prompt_ids) < len(episode.turns[0].prompt_ids)
    trainer.close()


def test_warmup_lowers_the_demonstration_nll(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, "trainer.total_training_steps=1")
    for g in trainer.backend.optimizer.param_groups:
        g["lr"] = 0.02
    nll: list[float] = []
    sft_warmup(trainer.backend, trainer.tokenizer, lambda: CorridorEnv(), "corridor", trainer.agent_loop.config,
               steps=12, episodes=4, rows_per_step=4, micro_batch=2, pad_token_id=trainer.pad_token_id,
               log=lambda step, m: nll.append(m["sft/nll"]))  # fmt: skip
    assert len(nll) == 12
    assert nll[-1] < 0.5 * nll[0], nll
    trainer.close()


def test_fit_runs_the_warmup_once_then_restores_rl_settings(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, "trainer.total_training_steps=1", "trainer.sft_warmup_steps=3")
    calls = []
    original = trainer.warmup

    def spy() -> dict[str, float]:
        calls.append(trainer.global_step)
        metrics = original()
        assert all(g["lr"] == pytest.approx(0.003) for g in trainer.backend.optimizer.param_groups)
        assert len(trainer.backend.optimizer.state) == 0  # RL starts with fresh Adam moments
        return metrics

    class StatusSink:
        def __init__(self) -> None:
            self.messages: list[str] = []

        def log(self, step: int, metrics: dict[str, float]) -> None:
            pass

        def status(self, text: str) -> None:
            self.messages.append(text)

        def close(self) -> None:
            pass

    sink = StatusSink()
    trainer.logger.sinks.append(sink)
    trainer.warmup = spy
    history = trainer.fit()
    assert calls == [0] and len(history) == 1
    assert sink.messages[0].startswith("SFT warm-up: playing 4 gold episodes")
    assert [m.split("  nll")[0] for m in sink.messages[1:]] == [f"SFT warm-up {k}/3" for k in (1, 2, 3)]
    records = read_metrics(tmp_path / "run")
    assert records[0]["step"] == 0 and records[0]["sft/nll"] > 0
    assert records[1]["step"] == 1


def test_warmup_on_an_env_without_gold_paths_fails_clearly(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, "trainer.total_training_steps=1")
    with pytest.raises(ValueError, match=r"no_gold.*no winning gold episode"):
        sft_warmup(trainer.backend, trainer.tokenizer, lambda: NoGoldEnv(), "no_gold", trainer.agent_loop.config,
                   steps=1, episodes=2, rows_per_step=2, micro_batch=2)  # fmt: skip
    trainer.close()


def test_quickstart_preset_warms_up_before_rl() -> None:
    config = load_config("quickstart", [])
    assert config.trainer.sft_warmup_steps > 0
    assert config.trainer.sft_lr > config.actor.lr
    assert config.trainer.sft_episodes >= config.trainer.sft_rows_per_step


def test_gold_engine_needs_the_envs_and_ends_a_used_up_path_without_an_action(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, "trainer.total_training_steps=1")
    chat = trainer.agent_loop.chat
    engine = GoldPathEngine(chat.encode, chat.eos_id)
    with pytest.raises(RuntimeError, match="prompts_from_envs"):
        engine.generate([[1, 2]], SamplingParams(max_new_tokens=4))
    env = CorridorEnv(length=2)
    env.reset(0)
    engine.prompts_from_envs([env])
    replies = [chat.decode(engine.generate([[1]], SamplingParams(max_new_tokens=4))[0].token_ids) for _ in range(3)]
    assert [parse_action(r.removesuffix(chat.tokenizer.eos_token)).text for r in replies[:2]] == ["go east"] * 2
    assert parse_action(replies[2].removesuffix(chat.tokenizer.eos_token)).kind == "invalid"  # the path is used up
    assert len(chat.encode(replies[0])) > 4  # never cut at max_new_tokens: a demonstration is the whole action
    # a corridor longer than the env's step budget: the gold path cannot win, so no demonstration is kept
    config = AgentLoopConfig(max_turns=4, max_prompt_length=768)
    long_corridor = demonstrations(chat.tokenizer, lambda: CorridorEnv(max_steps=2, length=3), "corridor", config, [1])
    assert len(long_corridor) == 1 and not long_corridor[0].success
    trainer.close()
