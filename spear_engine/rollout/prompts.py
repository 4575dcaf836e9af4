"""Prompt texts for the two sample layouts (our own wording; the structure follows verl-agent).

``step`` layout: every env step is one single-turn prompt holding the task, the last
``history_length`` (observation, action) pairs, the current observation and the admissible actions.
``trajectory`` layout: one conversation; the first user message holds the task and the first
observation, later user messages hold only the new observation.
"""

from __future__ import annotations

from collections.abc import Sequence

from spear_engine.envs.base import Observation

TOOL_ENVS = {"math"}
"""Environments whose actions are Python tool calls and a final answer, not text commands."""

_ROLE = {
    "alfworld": "You are an agent acting in a household simulator (ALFWorld).",
    "twx": "You are an agent playing a text adventure game.",
    "webshop": "You are a shopping agent on a web store (WebShop).",
    "math": "You are solving a problem and may run Python code to help.",
}
_COMMAND_FORMAT = (
    "First think about the situation inside <think> </think>. Then give exactly one action from the "
    "admissible actions inside <action> </action>."
)
_TOOL_FORMAT = (
    "Think inside <think> </think>. To run Python, write one ```python code block; its printed output "
    "comes back to you. When you are sure, give the final answer inside <answer> </answer>."
)


def instructions(env_name: str) -> str:
    return _TOOL_FORMAT if env_name in TOOL_ENVS else _COMMAND_FORMAT


def _admissible(observation: Observation) -> str:
    if not observation.admissible_actions:
        return ""
    return "\nAdmissible actions: [" + ", ".join(observation.admissible_actions) + "]"


def step_prompt(
    env_name: str,
    observation: Observation,
    history: Sequence[tuple[str, str]],
    step_count: int,
    history_length: int,
) -> str:
    """The single-turn prompt of env step ``step_count`` (0-based) in the step layout."""
    parts = [_ROLE.get(env_name, "You are an agent acting in an environment."), f"Your task is to: {observation.task}"]
    recent = list(history)[-history_length:] if history_length > 0 else []
    if recent:
        first = step_count - len(recent) + 1
        lines = [f"[step {first + i}] observation: {obs}\naction: {act}" for i, (obs, act) in enumerate(recent)]
        parts.append(f"You have taken {step_count} step(s). The most recent ones:\n" + "\n".join(lines))
    parts.append(f"Current observation (step {step_count + 1}): {observation.text}{_admissible(observation)}")
    parts.append(instructions(env_name))
    return "\n\n".join(parts)


def first_trajectory_message(env_name: str, observation: Observation) -> str:
    """The first user message of the trajectory layout."""
    role = _ROLE.get(env_name, "You are an agent acting in an environment.")
    return (
        f"{role}\n\nYour task is to: {observation.task}\n\n{instructions(env_name)}\n\n"
        f"Observation: {observation.text}{_admissible(observation)}"
    )


def next_trajectory_message(observation: Observation) -> str:
    """A later user message of the trajectory layout: the new observation."""
    return f"Observation: {observation.text}{_admissible(observation)}"
