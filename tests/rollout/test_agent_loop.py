"""The agent loop: action parsing, exact token bookkeeping in both layouts, gold play wins, env faults."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from spear_engine.data import RolloutBatch
from spear_engine.envs.base import Action, Observation, StepResult, make_env
from spear_engine.models import byte_tokenizer
from spear_engine.rollout.agent_loop import AgentLoop, AgentLoopConfig, ChatTokens
from spear_engine.rollout.engine import Generation, SamplingParams
from spear_engine.rollout.gold import render_action
from spear_engine.rollout.parsing import parse_action


# ------------------------------------------------------------------------------------------------
# parsing
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<think>go to <action>x</action>?</think><action>go to fridge 1</action>", Action("command", "go to fridge 1")),
        ("<action>look</action> then <action>inventory</action>", Action("command", "inventory")),
        ("<think>a</think>\n```python\nprint(1+1)\n```", Action("python", "print(1+1)")),
        ("<python>x = 2\nprint(x)</python>", Action("python", "x = 2\nprint(x)")),
        ('<tool_call>{"name": "python", "arguments": {"code": "print(3)"}}</tool_call>', Action("python", "print(3)")),
        ('<tool_call>{"name": "search", "arguments": {"q": 1}}</tool_call>', Action("invalid", '<tool_call>{"name": "search", "arguments": {"q": 1}}</tool_call>')),
        ("<think>hmm</think> The answer is <answer> 42 </answer>", Action("answer", "42")),
        ("so \\boxed{\\frac{1}{2}} done", Action("answer", "\\frac{1}{2}")),
        ("<think>I will <action>go</action></think> no action after thinking", Action("invalid", "no action after thinking")),
        ("", Action("invalid", "")),
        (None, Action("invalid", "")),
    ],
)  # fmt: skip
def test_parse_action(text: str | None, expected: Action) -> None:
    assert parse_action(text) == expected


# ------------------------------------------------------------------------------------------------
# a scripted engine that plays each env's gold path
# ------------------------------------------------------------------------------------------------
class GoldEngine:
    """Answers every prompt with the gold action of its task at its turn (read back from the prompt)."""

    name = "gold"

    def __init__(self, tokenizer, gold_by_task: dict[str, list[Action]], layout: str, wrong_every: int = 0) -> None:
        self.tok, self.gold, self.layout, self.wrong_every = tokenizer, gold_by_task, layout, wrong_every
        self.calls = 0

    def _turn(self, text: str) -> int:
        if self.layout == "step":
            return int(re.findall(r"Current observation \(step (\d+)\)", text)[-1]) - 1
        return text.count("Observation:") - 1

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Generation]:
        out = []
        for ids in prompts:
            text = self.tok.decode(ids)
            task = next(t for t in self.gold if t in text)
            turn = self._turn(text)
            self.calls += 1
            reply = render_action(self.gold[task][turn]) if not self.wrong_every or self.calls % self.wrong_every else "hmm"
            tokens = self.tok(reply, add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]
            tokens = tokens[: params.max_new_tokens]
            out.append(Generation(tokens, [-0.5] * len(tokens), "stop" if len(tokens) < params.max_new_tokens else "length"))
        return out

    def load_weights(self, named_tensors) -> None:
        pass

    def close(self) -> None:
        pass


def gold_paths(env_name: str, seeds: list[int]) -> dict[str, list[Action]]:
    env = make_env(env_name)
    try:
        paths = {}
        for seed in seeds:
            obs = env.reset(seed, "train")
            paths[obs.task] = env.gold_actions()
        return paths
    finally:
        env.close()


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


@pytest.mark.parametrize("layout", ["step", "trajectory"])
@pytest.mark.parametrize("env_name", ["webshop", "math"])
def test_gold_play_wins_and_tokens_round_trip(tokenizer, layout: str, env_name: str) -> None:
    seeds = [11, 23]
    engine = GoldEngine(tokenizer, gold_paths(env_name, seeds), layout)
    config = AgentLoopConfig(layout=layout, max_turns=10, max_prompt_length=8192, max_response_length=4096)
    loop = AgentLoop(engine, tokenizer, lambda: make_env(env_name), env_name, config)
    try:
        episodes, timing = loop.run(seeds, group_size=2, params=SamplingParams(max_new_tokens=4096))
    finally:
        loop.close()
    assert len(episodes) == 4 and all(e.success for e in episodes)
    assert [e.group_id for e in episodes] == [0, 0, 1, 1] and len({e.traj_id for e in episodes}) == 4
    assert timing["rollout/env_steps"] == sum(e.length for e in episodes)
    for episode in episodes:
        assert episode.reward > 0 and all(t.action_valid for t in episode.turns)
        assert episode.tool_calls == sum(1 for t in episode.turns if "<answer>" not in t.response_text)
        if layout == "trajectory":
            # the whole conversation is exactly prompt + response tokens of every turn, in order
            conversation = [tok for t in episode.turns for tok in (*t.prompt_ids, *t.response_ids)]
            text = tokenizer.decode(conversation)
            assert text.count("<|im_start|>assistant") == episode.length
            assert text.count("Observation:") == episode.length  # the first message and one per later turn
        else:
            for turn in episode.turns:
                assert tokenizer.decode(turn.prompt_ids).endswith("<|im_start|>assistant\n")
    batch = RolloutBatch.from_episodes(episodes, layout=layout)
    assert len(batch) == (4 if layout == "trajectory" else sum(e.length for e in episodes))
    for i, ids in enumerate(batch.policy_token_ids()):
        sampled = [t.response_ids for e in episodes for t in e.turns]
        if layout == "step":
            assert ids == sampled[i]
        else:
            assert ids == [tok for t in episodes[i].turns for tok in t.response_ids]
            # policy tokens are exactly the sampled tokens; everything else in the response region is masked
            region = batch.responses[i][batch.response_attention_mask[i].bool()].tolist()
            rebuilt = [tok for k, t in enumerate(episodes[i].turns) for tok in ((t.prompt_ids if k else []) + t.response_ids)]
            assert region == rebuilt
            assert batch.policy_mask[i].sum() == sum(len(t.response_ids) for t in episodes[i].turns)


def test_invalid_responses_are_flagged_and_episodes_end_at_max_turns(tokenizer) -> None:
    seeds = [5]
    engine = GoldEngine(tokenizer, gold_paths("webshop", seeds), "step", wrong_every=1)
    loop = AgentLoop(engine, tokenizer, lambda: make_env("webshop"), "webshop", AgentLoopConfig(max_turns=3))
    try:
        episodes, _ = loop.run(seeds, group_size=1, params=SamplingParams())
    finally:
        loop.close()
    (episode,) = episodes
    assert episode.length == 3 and not episode.success and episode.meta["end"] == "max_turns"
    assert not any(t.action_valid for t in episode.turns) and episode.tool_calls == 0
    batch = RolloutBatch.from_episodes(episodes)
    assert batch.invalid_actions.tolist() == [1, 1, 1]


class ExplodingEnv:
    name, max_steps = "exploding", 5

    def __init__(self) -> None:
        self.steps = 0

    def reset(self, seed: int, split: str = "train") -> Observation:
        if seed == 666:
            raise RuntimeError("reset exploded")
        return Observation(f"room {seed}", task=f"task {seed}")

    def step(self, action: Action) -> StepResult:
        raise ValueError("step exploded")

    def gold_actions(self) -> list[Action]:
        return []

    def close(self) -> None:
        pass


def test_env_faults_end_the_episode_and_the_batch_goes_on(tokenizer) -> None:
    engine = GoldEngine(tokenizer, {"task 1": [Action("command", "look")]}, "step")
    loop = AgentLoop(engine, tokenizer, ExplodingEnv, "exploding", AgentLoopConfig(max_turns=3))
    try:
        episodes, _ = loop.run([1, 666], group_size=1, params=SamplingParams())
    finally:
        loop.close()
    ok, broken = episodes
    assert ok.meta["end"] == "env_error" and "step exploded" in ok.meta["error"] and ok.length == 1
    assert broken.meta["end"] == "env_error" and "reset exploded" in broken.meta["error"] and broken.length == 0


def test_next_user_turn_matches_the_template_rendering(tokenizer) -> None:
    chat = ChatTokens(tokenizer)
    conversation = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    full = tokenizer.apply_chat_template([*conversation, {"role": "user", "content": "Observation: c"}],
                                         tokenize=False, add_generation_prompt=True)  # fmt: skip
    first = tokenizer.apply_chat_template(conversation[:1], tokenize=False, add_generation_prompt=True)
    ids = chat.encode(first) + chat.encode("b") + [chat.eos_id] + chat.next_user_turn("Observation: c")
    assert tokenizer.decode(ids) == full


def test_trajectory_rows_put_scores_on_the_last_sampled_token(tokenizer) -> None:
    seeds = [11]
    engine = GoldEngine(tokenizer, gold_paths("webshop", seeds), "trajectory")
    loop = AgentLoop(engine, tokenizer, lambda: make_env("webshop"), "webshop",
                     AgentLoopConfig(layout="trajectory", max_prompt_length=8192))  # fmt: skip
    try:
        episodes, _ = loop.run(seeds, group_size=1, params=SamplingParams(max_new_tokens=4096))
    finally:
        loop.close()
    from spear_engine.config_loading import load_config
    from spear_engine.pipeline import score_and_filter

    batch = RolloutBatch.from_episodes(episodes, layout="trajectory")
    scored, _ = score_and_filter(load_config("grpo"), batch, step=1)
    last_sampled = int(torch.nonzero(batch.policy_mask[0])[-1])
    assert scored.token_level_scores[0, last_sampled] == pytest.approx(episodes[0].reward)
    assert np.count_nonzero(scored.token_level_scores[0].numpy()) == 1
