"""The math + Python-tool environment over reasoning-gym tasks."""

from __future__ import annotations

import random
import re
import sys

import pytest

from spear_engine.envs.base import Action, Env, make_env
from spear_engine.envs.math_tool import MathToolEnv

pytest.importorskip("reasoning_gym")
pytest.importorskip("math_verify")

SEEDS = range(4_100, 4_106)


SLOW_OK = {"tool_timeout_s": 30.0}
"""Tool calls get a generous deadline in tests: a loaded 2-core machine starts Python slowly."""


@pytest.fixture(scope="module")
def env() -> MathToolEnv:
    return make_env("math", **SLOW_OK)


def play(env: MathToolEnv, actions: list[Action]):
    result = None
    for action in actions:
        result = env.step(action)
    return result


def test_registered_and_implements_the_protocol(env):
    assert isinstance(env, Env)
    assert env.name == "math" and env.max_steps == 8 and env.tasks == ("countdown", "gsm_symbolic")


@pytest.mark.parametrize("task", ["countdown", "gsm_symbolic", "basic_arithmetic"])
@pytest.mark.parametrize("split", ["train", "eval"])
def test_gold_path_solves(task, split):
    env = MathToolEnv(tasks=task, **SLOW_OK)
    for seed in SEEDS[:3]:
        env.reset(seed, split)
        gold = env.gold_actions()
        assert [a.kind for a in gold] == ["python", "answer"]
        tool = env.step(gold[0])
        assert tool.action_valid and not tool.done and tool.info["tool_calls"] == 1
        assert tool.observation.text.strip(), "the gold tool call prints something"
        result = env.step(gold[1])
        assert result.done and result.won and result.reward == 1.0, (task, seed, result.info)
        assert result.info["score"] >= 1.0 and result.info["tool_calls"] == 1


def test_countdown_gold_tool_call_computes_the_target():
    env = MathToolEnv(tasks="countdown", **SLOW_OK)
    env.reset(SEEDS[0])
    target = env._entry["metadata"]["target"]
    assert float(env.step(env.gold_actions()[0]).observation.text) == pytest.approx(target)


def test_both_default_tasks_appear(env):
    names = set()
    for seed in range(20):
        env.reset(seed)
        names.add(env._spec["name"])
    assert names == {"countdown", "gsm_symbolic"}


def test_random_answers_rarely_win():
    """Random arithmetic over countdown's numbers and random integers for gsm: measured 1/1000 wins."""
    rng = random.Random(1)
    wins = episodes = 0
    for task in ("countdown", "gsm_symbolic"):
        env = MathToolEnv(tasks=task)
        for seed in range(10_000, 10_100):
            env.reset(seed)
            if task == "countdown":
                numbers = [str(n) for n in env._entry["metadata"]["numbers"]]
                rng.shuffle(numbers)
                answer = numbers[0] + "".join(f" {rng.choice('+-*/')} {n}" for n in numbers[1:])
            else:
                answer = str(rng.randint(0, 1000))
            wins += env.step(Action("answer", answer)).won
            episodes += 1
    assert wins / episodes <= 0.03


def test_same_seed_same_question_and_disjoint_splits(env):
    other = make_env("math", **SLOW_OK)
    for seed in SEEDS:
        assert env.reset(seed, "eval").text == other.reset(seed, "eval").text
    train = {env.reset(seed, "train").text for seed in range(60)}
    evaluation = {env.reset(seed, "eval").text for seed in range(60)}
    assert len(train) >= 58 and not train & evaluation


def test_wrong_answer_scores_zero(env):
    env.reset(SEEDS[0])
    gold = str(env._entry["answer"])
    result = env.step(Action("answer", gold + "1"))
    assert result.done and not result.won and result.reward == 0.0
    assert result.info["score"] < 1.0 and "incorrect" in result.observation.text


def test_python_error_comes_back_as_text_and_counts(env):
    env.reset(SEEDS[1])
    result = env.step(Action("python", "numbers = [1, 2]\nprint(numbers[5])"))
    assert result.action_valid and not result.done and result.reward == 0.0
    assert result.observation.text.rstrip().endswith("IndexError: list index out of range")
    assert result.info["tool_calls"] == 1 and result.info["tool_exit_code"] == 1


def test_tool_call_counting():
    steps = [
        (Action("python", "print(2 + 2)"), True, 1),
        (Action("python", "def broken(:\n    pass"), False, 1),  # does not compile: invalid, not counted
        (Action("python", "   "), False, 1),
        (Action("command", "click[x]"), False, 1),
        (Action("invalid", ""), False, 1),
        (Action("python", "raise ValueError('boom')"), True, 2),  # ran, raised: counted
        (Action("python", "import time\ntime.sleep(30)"), True, 3),  # ran, timed out: counted
    ]
    env = MathToolEnv(**SLOW_OK)
    env.reset(SEEDS[2])
    observations = []
    for action, valid, count in steps:
        if "sleep" in action.text:
            env.tool_timeout_s = 1.0
        result = env.step(action)
        assert result.action_valid is valid, action
        assert result.info["tool_calls"] == count, action
        observations.append(result.observation.text)
    assert observations[0] == "4" and "SyntaxError" in observations[1]
    assert "TimeoutError: the code ran longer than 1 s" in observations[-1]


def test_max_steps_ends_the_episode():
    env = MathToolEnv(max_steps=3)
    env.reset(SEEDS[3])
    outcomes = [env.step(Action("command", "look")) for _ in range(3)]
    assert [o.done for o in outcomes] == [False, False, True]
    assert outcomes[-1].info["truncated"] and outcomes[-1].reward == 0.0
    with pytest.raises(RuntimeError):
        env.step(Action("answer", "1"))


def test_math_verify_fallback_for_numeric_answers():
    env = MathToolEnv(tasks="gsm_symbolic")
    env.reset(SEEDS[4])
    gold = str(env._entry["answer"])
    # gsm_symbolic's own verifier reads the first number (here 3), math-verify finds the boxed one
    result = env.step(Action("answer", f"After 3 steps the result is \\boxed{{{gold}}}"))
    assert result.won and result.reward == 1.0
    env.reset(SEEDS[4])
    assert env.score_answer(f"After 3 steps the result is \\boxed{{{int(float(gold)) + 1}}}") < 1.0


def test_code_in_an_answer_runs_only_in_the_sandbox(tmp_path):
    env = MathToolEnv(tasks="countdown")  # countdown's verifier runs sympy's parse_expr (eval) on the answer
    env.reset(SEEDS[5])
    marker = tmp_path / "pwned"
    answer = f"__import__('os').system('touch {marker}') or __import__('pathlib').Path('{marker}').touch()"
    result = env.step(Action("answer", answer))
    assert not result.won and result.reward == 0.0
    assert not marker.exists()


def test_the_scoring_program_scores_in_the_sandbox_as_the_verifier_does():
    env = MathToolEnv(tasks="countdown")  # math_score_child.py, run as the sandbox's code
    env.reset(SEEDS[5])
    gold = env.gold_actions()[-1].text
    assert env._score_in_sandbox(gold, numeric_gold=False) == 1.0
    assert env._score_in_sandbox("1 + 2", numeric_gold=False) < 1.0


def test_other_reasoning_gym_tasks_and_options():
    env = MathToolEnv(tasks=["chain_sum"], **SLOW_OK, dataset_kwargs={"chain_sum": {"min_terms": 2, "max_terms": 2}})
    obs = env.reset(3)
    assert len(re.findall(r"\d+", obs.text.split("=")[0])) >= 2
    assert play(env, env.gold_actions()).won
    with pytest.raises(ValueError, match="unknown reasoning-gym dataset"):
        MathToolEnv(tasks="no_such_task")


def test_missing_package_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "reasoning_gym", None)
    with pytest.raises(ImportError, match="pip install reasoning-gym"):
        MathToolEnv()
