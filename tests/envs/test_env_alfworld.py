"""The alfworld env: real ALFWorld engine on generated tasks — winnable, deterministic, split-disjoint."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import subprocess
import sys

import pytest
from env_helpers import play, random_policy_wins

from spear_engine.envs import alfworld_tasks as tasks
from spear_engine.envs.base import Action, Env, available_envs, make_env

pytest.importorskip("alfworld", reason="needs pip install alfworld==0.4.2")
pytest.importorskip("fast_downward", reason="needs textworld[pddl]")

from spear_engine.envs import alfworld as alf

# One regex per task type, from ALFWorld's templates: the sentence must name the right kind of task.
TASK_PATTERNS = {
    "pick_and_place_simple": r"^(put a \w+ in \w+|put some \w+ on \w+)\.$",
    "look_at_obj_in_light": r"^(look at \w+ under the desklamp|examine the \w+ with the desklamp)\.$",
    "pick_clean_then_place_in_recep": r"^(put a clean \w+ in \w+|clean some \w+ and put it in \w+)\.$",
    "pick_heat_then_place_in_recep": r"^(put a hot \w+ in \w+|heat some \w+ and put it in \w+)\.$",
    "pick_cool_then_place_in_recep": r"^(put a cool \w+ in \w+|cool some \w+ and put it in \w+)\.$",
    "pick_two_obj_and_place": r"^(put two \w+ in \w+|find two \w+ and put them in \w+)\.$",
}
GOLD_SEEDS = (11, 29, 47)


@pytest.fixture(scope="module")
def env():
    e = alf.AlfWorldEnv()
    yield e
    e.close()


@pytest.fixture(scope="module")
def typed_envs():
    """One env per task type, made on first use (each holds its own planner library)."""
    envs: dict[str, alf.AlfWorldEnv] = {}

    def get(task_type: str) -> alf.AlfWorldEnv:
        if task_type not in envs:
            envs[task_type] = alf.AlfWorldEnv(task_types=[task_type])
        return envs[task_type]

    yield get
    for e in envs.values():
        e.close()


def test_registered_and_satisfies_protocol(env):
    assert "alfworld" in available_envs()
    assert isinstance(env, Env)
    made = make_env("alfworld", max_steps=7)
    try:
        assert isinstance(made, alf.AlfWorldEnv) and made.max_steps == 7
    finally:
        made.close()


@pytest.mark.parametrize("task_type", tasks.TASK_TYPES)
def test_gold_path_wins(typed_envs, task_type):
    env = typed_envs(task_type)
    for seed in GOLD_SEEDS:
        obs = env.reset(seed, "train")
        assert env.task_type == task_type
        assert re.match(TASK_PATTERNS[task_type], obs.task), obs.task
        assert obs.text.startswith("You are in the middle of a room. Looking quickly around you, you see ")
        assert f"Your task is to: {obs.task}" in obs.text
        gold = env.gold_actions()
        assert gold and all(a.kind == "command" for a in gold)
        results = play(env, gold)
        for r in results[:-1]:
            assert r.action_valid and not r.done and not r.won and r.reward == 0.0
        last = results[-1]
        assert last.action_valid and last.won and last.done and last.reward == alf.WIN_REWARD == 10.0
        assert last.info["won"] and not last.info["truncated"]


def test_observations_read_like_alfworld(typed_envs):
    env = typed_envs("pick_clean_then_place_in_recep")
    obs = env.reset(5, "train")
    assert "go to sinkbasin 1" in obs.admissible_actions
    assert {"look", "inventory"} <= set(obs.admissible_actions)
    assert "help" not in obs.admissible_actions
    texts = [r.observation.text for r in play(env, env.gold_actions())]
    assert texts[0].startswith("You arrive at ")
    assert any(re.match(r"You pick up the \w+ \d+ from the \w+ \d+\.", t) for t in texts)
    assert any(re.match(r"You clean the \w+ \d+ using the sinkbasin \d+\.", t) for t in texts)
    assert re.match(r"You move the \w+ \d+ to the \w+ \d+\.", texts[-1])


def test_random_policy_rarely_wins(env):
    """Measured 1 win in 200 random episodes of 30 steps (all task types, seeds 5000-5199); allow 1 in 20."""
    assert random_policy_wins(env, range(300, 320), random.Random(2024)) <= 1


def test_reset_is_deterministic(env):
    first = env.reset(8, "train")
    gold = [a.text for a in env.gold_actions()]
    env.step(env.gold_actions()[0])
    same_game = env.reset(8, "train")  # same game loaded: a plain engine reset
    env.reset(9, "train")  # load another game in between
    reloaded = env.reset(8, "train")
    for again in (same_game, reloaded):
        assert (again.text, again.task, again.admissible_actions) == (first.text, first.task, first.admissible_actions)
        assert [a.text for a in env.gold_actions()] == gold


def test_different_seeds_give_different_tasks(env):
    keys = {tasks.problem_key(tasks.generate_problem(s, "train")) for s in range(200)}
    assert len(keys) == 200
    texts = {env.reset(s, "train").text for s in range(4)}
    assert len(texts) == 4


def test_generation_is_deterministic_across_processes():
    """The problem text must not depend on Python's hash seed (sets are never iterated unsorted)."""
    code = (
        "import hashlib\n"
        "from spear_engine.envs.alfworld_tasks import generate_problem, problem_pddl\n"
        "print(hashlib.sha256(''.join(problem_pddl(generate_problem(s, sp)) for s in range(12)"
        " for sp in ('train', 'eval')).encode()).hexdigest())\n"
    )
    here = hashlib.sha256(
        "".join(tasks.problem_pddl(tasks.generate_problem(s, sp)) for s in range(12) for sp in ("train", "eval")).encode()
    ).hexdigest()
    for hash_seed in ("0", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == here


def test_train_and_eval_never_share_a_task(env):
    train = {tasks.problem_key(tasks.generate_problem(s, "train")) for s in range(400)}
    evals = {tasks.problem_key(tasks.generate_problem(s, "eval")) for s in range(400)}
    assert not train & evals
    assert env.reset(3, "train").text != env.reset(3, "eval").text
    with pytest.raises(ValueError, match="split"):
        env.reset(3, "test")


def test_all_six_task_types_are_generated(env):
    seen = {}
    for seed in range(60):
        problem = tasks.generate_problem(seed, "train")
        assert re.match(TASK_PATTERNS[problem.task_type], problem.task + ".")
        seen.setdefault(problem.task_type, problem.task)
    assert set(seen) == set(tasks.TASK_TYPES)
    # the engine shows the generator's sentence
    obs = env.reset(0, "train")
    assert obs.task == tasks.generate_problem(0, "train").task + "."


def test_invalid_commands_are_flagged_and_harmless(env):
    obs = env.reset(21, "train")
    for text in ("fly to the moon", "go to cabinet 99", "", "take"):
        r = env.step(Action("command", text))
        assert not r.action_valid and r.reward == 0.0 and not r.done and not r.won
        assert r.observation.text == "Nothing happens."
        assert r.observation.admissible_actions == obs.admissible_actions
        assert r.observation.task == obs.task
    for kind in ("python", "answer", "invalid"):
        r = env.step(Action(kind, obs.admissible_actions[0]))
        assert not r.action_valid and r.observation.text == "Nothing happens."
    # extra spaces and capitals still name an admissible command
    r = env.step(Action("command", "  LOOK "))
    assert r.action_valid and r.observation.text.startswith("You are in the middle of a room.")
    assert env.step(Action("command", "help")).action_valid  # hidden from the list, still a command


def test_max_steps_ends_the_episode():
    env = alf.AlfWorldEnv(max_steps=3)
    try:
        env.reset(4, "train")
        results = [env.step(Action("command", "inventory")) for _ in range(3)]
        assert [r.done for r in results] == [False, False, True]
        assert not results[-1].won and results[-1].info["truncated"] and results[-1].reward == 0.0
        with pytest.raises(RuntimeError, match="reset"):
            env.step(Action("command", "look"))
        env.reset(4, "train")  # a new episode starts fine
        assert not env.step(Action("command", "look")).done
    finally:
        env.close()
    with pytest.raises(RuntimeError, match="closed"):
        env.reset(4, "train")
    env.close()  # idempotent


def test_default_max_steps_is_50(env):
    assert env.max_steps == 50


def test_text_speedups_do_not_change_the_text(env):
    def transcript():
        out = []
        for seed in (31, 32):
            rng = random.Random(seed)
            obs = env.reset(seed, "train")
            out.append((obs.text, obs.admissible_actions, [a.text for a in env.gold_actions()]))
            for _ in range(25):
                r = env.step(Action("command", rng.choice([*obs.admissible_actions, "help"])))
                obs = r.observation
                out.append((obs.text, obs.admissible_actions, r.won))
            env.reset(seed, "train")
            out += [(r.observation.text, r.observation.admissible_actions) for r in play(env, env.gold_actions())]
        return out

    fast = transcript()
    alf.remove_text_speedups()
    try:
        plain = transcript()
    finally:
        alf.install_text_speedups()
    assert fast == plain


def test_game_files_are_cached_tw_pddl():
    path, meta = alf.game_file(77, "eval")
    again, _ = alf.game_file(77, "eval")
    assert path == again and os.path.exists(path) and path.endswith(".tw-pddl")
    with open(path) as f:
        game = json.load(f)
    assert {"pddl_domain", "grammar", "pddl_problem"} <= set(game)
    assert "(define (domain alfred)" in game["pddl_domain"]
    assert "UNKNOWN GOAL" not in game["grammar"] and meta["task"] in game["grammar"]


def test_task_type_selection():
    assert tasks.normalize_task_types(None) == tasks.TASK_TYPES
    assert tasks.normalize_task_types([1, "pick_two_obj"]) == ("pick_and_place_simple", "pick_two_obj_and_place")
    with pytest.raises(ValueError, match="unknown ALFWorld task type"):
        tasks.normalize_task_types(["slice_things"])
    with pytest.raises(ValueError, match=r"1\.\.6"):
        tasks.normalize_task_types([7])
    for seed in range(10):
        assert tasks.generate_problem(seed, "train", ("pick_cool_then_place_in_recep",)).room == "kitchen"


def test_missing_engine_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "alfworld", None)  # makes `import alfworld` fail
    with pytest.raises(ImportError, match=r"pip install alfworld==0\.4\.2"):
        alf.AlfWorldEnv()


def test_envs_in_parallel_threads_match_sequential_play(capfd):
    """The agent loop resets and steps its envs from worker threads; TextWorld's parsers and the
    fast-downward translator are not thread-safe, so the env must serialise them: parallel play gives
    exactly the sequential transcripts, no errors, and nothing printed."""
    from concurrent.futures import ThreadPoolExecutor

    seeds = [300 + i for i in range(8)]

    def transcript(env, seed):
        obs = env.reset(seed, "train")
        lines = [obs.text]
        for action in env.gold_actions()[:3]:
            lines.append(env.step(action).observation.text)
        return lines

    envs = [make_env("alfworld", max_steps=10) for _ in seeds]
    try:
        expected = [transcript(e, s) for e, s in zip(envs, seeds)]
        capfd.readouterr()
        for _ in range(2):
            with ThreadPoolExecutor(len(seeds)) as pool:
                got = list(pool.map(transcript, envs, seeds))
            assert got == expected
        out, _ = capfd.readouterr()
        assert out == ""
    finally:
        for e in envs:
            e.close()


def test_envs_sharing_a_cached_game_translation_do_not_share_state():
    """A GRPO group loads one game n times; the translation is cached (one per group), so each env
    must still get its own state: moves in one are invisible in the other, and both can win."""
    a, b = make_env("alfworld", max_steps=30), make_env("alfworld", max_steps=30)
    try:
        first_a, first_b = a.reset(777, "train"), b.reset(777, "train")
        assert first_a == first_b
        gold = a.gold_actions()
        moved = a.step(gold[0])
        assert moved.action_valid and moved.observation.text != first_a.text
        assert b.step(Action("command", "look")).observation.admissible_actions == first_b.admissible_actions
        assert play(b, gold)[-1].won  # b's detour ("look") does not change the plan's validity
        assert play(a, gold[1:])[-1].won
    finally:
        a.close()
        b.close()
