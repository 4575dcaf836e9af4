"""Write the built-in demo recording: synthetic ALFWorld-style episodes for `spear demo`.

The episodes are generated, not played by a model: each prompt group is a household task with a
gold action path; a trajectory follows it with a probability that grows from batch to batch (as a
learning agent would), otherwise it wanders until the step limit. The batches include every case
the Dr.BoT filters and the invalid-action path must handle: void turns (no <action>), an endless
repetition, mojibake bytes and an overlong response. Tokens are UTF-8 bytes (vocabulary 256).

    python scripts/make_demo_batch.py            # rewrites spear_engine/data/demo_rollouts.json.gz
"""

from __future__ import annotations

import math
import random
from pathlib import Path

from spear_engine.data import Episode, Turn, save_episodes

OUT = Path(__file__).resolve().parents[1] / "spear_engine" / "data" / "demo_rollouts.json.gz"
TASKS = [
    ("put a clean mug in coffeemachine", ["go to countertop 1", "take mug 1 from countertop 1", "go to sinkbasin 1",
                                           "clean mug 1 with sinkbasin 1", "go to coffeemachine 1",
                                           "put mug 1 in/on coffeemachine 1"]),
    ("heat some egg and put it in garbagecan", ["go to fridge 1", "open fridge 1", "take egg 2 from fridge 1",
                                                "go to microwave 1", "heat egg 2 with microwave 1",
                                                "go to garbagecan 1", "put egg 2 in/on garbagecan 1"]),
    ("look at bowl under the desklamp", ["go to shelf 2", "take bowl 1 from shelf 2", "go to desk 1",
                                         "use desklamp 1"]),
    ("put two cellphone in sofa", ["go to bed 1", "take cellphone 1 from bed 1", "go to sofa 1",
                                   "put cellphone 1 in/on sofa 1", "go to dresser 1",
                                   "take cellphone 3 from dresser 1", "go to sofa 1", "put cellphone 3 in/on sofa 1"]),
]  # fmt: skip
DISTRACTORS = ["go to cabinet 3", "open drawer 2", "examine shelf 1", "go to toilet 1", "inventory", "look"]
MAX_STEPS = 10
GROUP_SIZE = 4
BATCHES = 5
PROMPT_BYTES = 64


def observation(task: str, location: str) -> str:
    return f"Your task is to: {task}. You are at {location}. What do you do next?"


def response_for(action: str, rng: random.Random, case: str) -> tuple[str, bool]:
    think = f"<think>I should {action} next.</think>"
    if case == "void":
        return think + " I am not sure what to do.", False
    if case == "repetitive":
        return think + "<action>" + ("go to shelf 1 and look around " * 14) + "</action>", True
    if case == "unreadable":
        return think + f"<action>{action} \ufffd\ufffd</action>", True
    if case == "overlong":
        return think + "<action>" + action + " " + "very " * 110 + "carefully</action>", True
    return f"{think}<action>{action}</action>", True


def play(task: str, gold: list[str], success_p: float, rng: random.Random, special: str | None) -> tuple[list[Turn], bool]:
    turns: list[Turn] = []
    follows_gold = rng.random() < success_p
    location = "the middle of a room"
    progress = 0
    for step in range(MAX_STEPS):
        case = special if (special and step == 1) else ("void" if rng.random() < 0.08 else "ok")
        if follows_gold and (rng.random() > 0.15 or progress == 0):
            action = gold[progress]
        else:
            action = rng.choice(DISTRACTORS)
        text, valid = response_for(action, rng, case)
        won = False
        if valid and action == gold[progress] and case == "ok":
            progress += 1
            won = progress == len(gold)
        obs = observation(task, location)
        prompt_ids = list(obs.encode())[-PROMPT_BYTES:]
        response_ids = list(text.encode())
        logp = [round(math.log(1.0 / 256) + rng.uniform(-0.5, 0.5), 4) for _ in response_ids]
        turns.append(
            Turn(
                prompt_ids=prompt_ids,
                response_ids=response_ids,
                rollout_log_probs=logp,
                response_text=text,
                observation=obs,
                action_valid=valid,
                tool_calls=int(valid),
                reward=10.0 if won else 0.0,
            )
        )
        if valid and action.startswith("go to "):
            location = action.removeprefix("go to ")
        if won:
            return turns, True
    return turns, False


def main() -> None:
    rng = random.Random(2509)
    rollouts = []
    traj_id = 0
    specials = ["void", "repetitive", "unreadable", "overlong"]
    for b in range(BATCHES):
        success_p = 0.2 + 0.15 * b
        batch = []
        for g, (task, gold) in enumerate(TASKS):
            for k in range(GROUP_SIZE):
                special = specials[(b + g) % len(specials)] if k == 0 else None
                turns, won = play(task, gold, success_p, rng, special)
                batch.append(Episode(group_id=b * len(TASKS) + g, traj_id=traj_id, turns=turns, success=won))
                traj_id += 1
        rollouts.append(batch)
    meta = {
        "source": "scripts/make_demo_batch.py (synthetic ALFWorld-style episodes)",
        "tokenizer": "utf-8 bytes",
        "vocab_size": 256,
        "max_steps": MAX_STEPS,
        "group_size": GROUP_SIZE,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    save_episodes(OUT, rollouts, meta)
    n_eps = sum(len(b) for b in rollouts)
    n_turns = sum(e.length for b in rollouts for e in b)
    wins = sum(e.success for b in rollouts for e in b)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes): {len(rollouts)} batches, {n_eps} episodes, {n_turns} turns, {wins} wins")


if __name__ == "__main__":
    main()
