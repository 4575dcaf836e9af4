"""Turn a policy response into an :class:`~spear_engine.envs.base.Action`.

Only the text after the last ``</think>`` counts (the reasoning may mention tags). Recognised, in
this order: ``<action>…</action>`` (an env command), a Python tool call (a fenced python block,
``<python>…</python>``, or a ``<tool_call>`` JSON naming a python tool), ``<answer>…</answer>`` or a
final ``\\boxed{…}`` (a final answer). Anything else is ``Action("invalid", text)``: the env answers
it as an invalid action and the invalid-action penalty applies.
"""

from __future__ import annotations

import json
import re

from spear_engine.envs.base import Action

_THINK_END = "</think>"
_ACTION = re.compile(r"<action>(.*?)</action>", re.S)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S)
_PYTHON_TAG = re.compile(r"<python>(.*?)</python>", re.S)
_FENCED = re.compile(r"```(?:python|py)[ \t]*\n(.*?)```", re.S)
_TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)
PYTHON_TOOL_NAMES = ("python", "code_interpreter", "run_python", "execute_python")


def after_last_think(text: str) -> str:
    """The part of a response after its last ``</think>`` (all of it when there is none)."""
    cut = text.rfind(_THINK_END)
    return text if cut < 0 else text[cut + len(_THINK_END) :]


def _boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` with balanced braces, or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None


def _tool_call_code(body: str) -> str | None:
    try:
        call = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(call, dict) or call.get("name") not in PYTHON_TOOL_NAMES:
        return None
    args = call.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    code = args.get("code") if isinstance(args, dict) else None
    return code if isinstance(code, str) else None


def parse_action(response: str | None) -> Action:
    """The action a response takes (see the module docstring for the grammar)."""
    if not response or not response.strip():
        return Action("invalid", "")
    tail = after_last_think(response)
    found = _ACTION.findall(tail)
    if found:
        return Action("command", found[-1].strip())
    for pattern in (_FENCED, _PYTHON_TAG):
        code = pattern.findall(tail)
        if code:
            return Action("python", code[-1].strip("\n"))
    for body in _TOOL_CALL.findall(tail):
        code = _tool_call_code(body.strip())
        if code is not None:
            return Action("python", code)
    answers = _ANSWER.findall(tail)
    if answers:
        return Action("answer", answers[-1].strip())
    boxed = _boxed(tail)
    if boxed is not None:
        return Action("answer", boxed.strip())
    return Action("invalid", tail.strip())
