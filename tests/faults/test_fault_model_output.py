"""Model output faults: empty, overlong, unreadable bytes, endless repetition, no action, a tool call that
does not parse. Each takes the invalid-action path and / or is flagged by the Dr.BoT filters (its loss
mask row zeroed); nothing crashes, through the agent loop, ``pipeline.score_and_filter`` and a trainer
step."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from fault_helpers import FaultyLuckyEnv, ScriptedEngine, seed_of, tiny_config

from spear_engine.config_loading import load_config
from spear_engine.data import RolloutBatch
from spear_engine.envs.base import make_env
from spear_engine.models import byte_tokenizer
from spear_engine.pipeline import compute_advantages, score_and_filter
from spear_engine.rollout.agent_loop import AgentLoop, AgentLoopConfig
from spear_engine.rollout.engine import SamplingParams
from spear_engine.train.trainer import Trainer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
MAX_NEW = 64
GOOD = "<action>a</action>"


def pathological_replies(engine: ScriptedEngine, unreadable_ids: list[int]) -> dict[str, list[int]]:
    """name -> the token ids the 'model' returns."""
    eos = engine.tokenizer.eos_token_id
    return {
        "empty": [],
        "only_eos": [eos],
        "overlong": engine.encode("I keep thinking " * 40, eos=False),  # cut at the budget, no eos
        "unreadable": unreadable_ids + engine.encode(GOOD),
        "repetition": engine.encode("la " * 40, eos=False),
        "no_action": engine.encode("I am not sure what to do."),
        "bad_tool_call": engine.encode('<tool_call>{"name": "python", "arguments": {</tool_call>'),
        "unclosed_action": engine.encode("<action>go to the"),
        "control_bytes": engine.encode("\x00\x01\x1b[2J\u202e"),
        "good": engine.encode(GOOD),
    }


NAMES = ["empty", "only_eos", "overlong", "unreadable", "repetition", "no_action", "bad_tool_call",
         "unclosed_action", "control_bytes", "good"]  # fmt: skip
# Which Dr.BoT filter flags each (data.max_response_length = MAX_NEW); all but `good` and `unreadable` (whose
# action follows the bad bytes) have no action and are flagged incomplete.
FLAGGED = {"overlong_responses": {"overlong", "repetition"}, "unreadableBPE_responses": {"unreadable"},
           "repetitive_responses": {"repetition"}}  # fmt: skip


def engine_by_seed(tokenizer, unreadable_ids: list[int]) -> ScriptedEngine:
    engine = ScriptedEngine(tokenizer)
    replies = pathological_replies(engine, unreadable_ids)
    engine.reply = lambda text: replies[NAMES[seed_of(text)]]
    return engine


def test_pathological_outputs_through_the_agent_loop_and_the_filters() -> None:
    tokenizer = byte_tokenizer()
    unreadable = [tokenizer.convert_tokens_to_ids("ÿ")]  # the lone byte 0xff: not UTF-8
    engine = engine_by_seed(tokenizer, unreadable)
    loop = AgentLoop(engine, tokenizer, FaultyLuckyEnv, "faulty_lucky",
                     AgentLoopConfig(max_turns=1, max_prompt_length=4096, max_response_length=MAX_NEW))  # fmt: skip
    try:
        episodes, timing = loop.run(list(range(len(NAMES))), group_size=1, params=SamplingParams(max_new_tokens=999))
    finally:
        loop.close()
    assert timing["rollout/env_errors"] == 0
    by_name = {NAMES[e.meta["seed"]]: e for e in episodes}
    for name, episode in by_name.items():
        (turn,) = episode.turns
        assert turn.action_valid == (name in ("good", "unreadable")), name  # the rest: invalid actions, no crash
        assert len(turn.response_ids) <= MAX_NEW
    assert "\ufffd" in by_name["unreadable"].turns[0].response_text
    assert len(by_name["overlong"].turns[0].response_ids) == MAX_NEW

    batch = RolloutBatch.from_episodes(episodes, pad_token_id=tokenizer.pad_token_id)
    config = load_config("drbot", [f"data.max_response_length={MAX_NEW}", "rollout.rollout_filter_ratio=1.0"])
    scored, metrics = score_and_filter(config, batch, step=1)
    rows = {NAMES[int(s)]: i for i, s in enumerate(batch.group_ids)}
    assert metrics["incomplete_responses"] == len(NAMES) - 2  # no action: all but `good` and `unreadable`
    for metric, names in FLAGGED.items():
        assert metrics[metric] == len(names), metric
    for name, i in rows.items():
        kept = bool(scored.response_mask[i].any())
        assert kept == (name == "good"), name  # every unusable response is masked out of the loss
    advantages, m = compute_advantages(config, scored)
    assert torch.isfinite(advantages.advantages).all() and all(math.isfinite(v) for v in m.values())
    assert m["valid_action_ratio"] == pytest.approx(2 / len(NAMES))


def test_code_that_does_not_parse_is_an_invalid_tool_call_in_the_math_env() -> None:
    tokenizer = byte_tokenizer()
    replies = [
        "```python\nprint(1 +\n```",  # a syntax error
        '<tool_call>{"name": "python", "arguments": "{\\"code\\": 1}"}</tool_call>',  # code is not a string
        "```python\n" + "x=1\n" * 26_000 + "```",  # longer than the tool accepts
        "<answer></answer>",  # an empty final answer
    ]
    engine = ScriptedEngine(tokenizer)
    engine.reply = lambda text: engine.encode(replies[(engine.calls - 1) % len(replies)])
    loop = AgentLoop(engine, tokenizer, lambda: make_env("math", max_steps=8), "math",
                     AgentLoopConfig(max_turns=4, max_prompt_length=8192, max_response_length=200_000))  # fmt: skip
    try:
        (episode,), timing = loop.run([3], group_size=1, params=SamplingParams(max_new_tokens=200_000))
    finally:
        loop.close()
    assert timing["rollout/env_errors"] == 0 and episode.meta["end"] == "done"
    syntax, not_a_string, too_long, answer = episode.turns
    assert not syntax.action_valid and not not_a_string.action_valid and not too_long.action_valid
    assert answer.action_valid and episode.tool_calls == 0 and episode.reward == 0.0
    # each turn's observation is what the previous action got back
    assert "SyntaxError" in not_a_string.observation
    assert "Invalid action" in too_long.observation
    assert "longer than 100000 bytes" in answer.observation


def test_a_trainer_step_on_unusable_outputs_does_not_crash(tmp_path: Path) -> None:
    config = tiny_config("drbot", tmp_path, 2, f"data.max_response_length={MAX_NEW}",
                         "algorithm.filter_incomplete_responses=true", "algorithm.filter_overlong_responses=true")  # fmt: skip
    trainer = Trainer(config, console=False)
    tokenizer = trainer.tokenizer
    unreadable = [i for i in range(300) if "\ufffd" in tokenizer.decode([i])][:2]
    engine = ScriptedEngine(tokenizer)
    replies = pathological_replies(engine, unreadable)
    names = iter(NAMES * 100)
    engine.reply = lambda text: replies[next(names)]
    trainer.agent_loop.engine = engine
    try:
        mixed = trainer.train_step()
        engine.reply = lambda text: replies["repetition"]  # a step where no response is usable at all
        unusable = trainer.train_step()
    finally:
        trainer.close()
    for metrics in (mixed, unusable):
        assert all(math.isfinite(v) for v in metrics.values()), metrics
    assert mixed["incomplete_responses"] >= 1 and mixed["unreadableBPE_responses"] >= 1
    assert mixed["overlong_responses"] >= 1 and mixed["repetitive_responses"] >= 1
    assert unusable["repetitive_responses"] == unusable["rollout/env_steps"] > 0  # every step-sample flagged
