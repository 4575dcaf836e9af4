"""The bodies of the ``spear`` subcommands (the CLI module only parses arguments)."""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel

from spear_engine.config import SpearConfig
from spear_engine.config_loading import config_to_yaml, list_presets, load_config, load_preset_dict


def show_presets(name: str | None, keys: bool) -> int:
    """``spear presets``: list, show one resolved, or document every key."""
    if keys:
        for line in describe_keys(SpearConfig):
            print(line)
        return 0
    if name:
        print(config_to_yaml(load_config(name)), end="")
        return 0
    for preset in list_presets():
        print(f"{preset:16s} {load_preset_dict(preset).get('description', '')}")
    return 0


def describe_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """One line per key: dotted name, default, and the documentation written where it is declared."""
    lines = []
    defaults = model()
    for name, field in model.model_fields.items():
        dotted = f"{prefix}{name}"
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            lines.extend(describe_keys(annotation, f"{dotted}."))
            continue
        doc = " ".join((field.description or "").split())
        lines.append(f"{dotted} = {getattr(defaults, name)!r}" + (f"\n    {doc}" if doc else ""))
    return lines


def run_demo(
    preset: str, overrides: Sequence[str], config_file: str | None, steps: int, seed: int, batch: str | None
) -> int:
    """``spear demo``: the algorithm core on the recorded batch (see :mod:`spear_engine.demo`)."""
    from spear_engine.demo import run

    config = load_config(preset, overrides, config_file)
    run(config, steps=steps, seed=seed, recording=batch)
    return 0
