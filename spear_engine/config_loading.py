"""Presets, YAML files and dotted ``key=value`` overrides -> a validated :class:`SpearConfig`.

Errors are :class:`ConfigError` with a message that names the key, the bad value and what is allowed
(or the nearest known key), so a typo fails at load time rather than hours into a run.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import BaseModel, ValidationError

from spear_engine.config import SpearConfig

PRESET_DIR = Path(__file__).parent / "presets"
INHERIT_KEY = "inherit"


class ConfigError(ValueError):
    """A user error in a config, preset or override; the message says what is wrong and how to fix it."""


# ------------------------------------------------------------------------------------------------
# presets
# ------------------------------------------------------------------------------------------------
def list_presets() -> list[str]:
    """Names of the built-in presets."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML parse error on one line: what is wrong and where."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({yaml_problem(err)}); fix the file") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def _preset_path(name: str) -> Path:
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        known = list_presets()
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown preset '{name}'.{hint} Known presets: {', '.join(known)}.")
    return path


def load_yaml_with_inheritance(path: Path, _chain: tuple[str, ...] = ()) -> dict[str, Any]:
    """Read a preset or config file, resolving ``inherit: <preset>`` (applied first, then this file)."""
    if str(path) in _chain:
        raise ConfigError(f"preset inheritance loops: {' -> '.join((*_chain, str(path)))}")
    data = _read_yaml(path)
    parent = data.pop(INHERIT_KEY, None)
    if parent is None:
        return data
    base = load_yaml_with_inheritance(_preset_path(str(parent)), (*_chain, str(path)))
    return merge_layer(base, data)


def load_preset_dict(name: str) -> dict[str, Any]:
    """The raw (unvalidated) mapping of a preset, inheritance resolved."""
    data = load_yaml_with_inheritance(_preset_path(name))
    data.setdefault("preset", name)
    return data


def deep_merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Recursively merge ``update`` into a copy of ``base`` (mappings merge, everything else replaces)."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


# ------------------------------------------------------------------------------------------------
# overrides
# ------------------------------------------------------------------------------------------------
def parse_overrides(overrides: Iterable[str]) -> dict[str, Any]:
    """``["actor.clip_ratio_high=0.28", "replay.enable_trajectory_replay=true"]`` -> nested dict.

    Values are parsed as YAML scalars (``null``, ``true``, ``1e-6``, ``[1, 2]``); strings need no quotes.
    """
    nested: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(
                f"override '{item}' is not of the form key=value (for example actor.clip_ratio_high=0.28)"
            )
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"override '{item}': the value is not valid YAML ({yaml_problem(err)}); quote it "
                              f"or fix it, e.g. key='[1, 2]'") from err
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override '{item}' conflicts with an earlier override of '{part}'")
            node = child
        node[parts[-1]] = value
    return nested


# ------------------------------------------------------------------------------------------------
# loading and error messages
# ------------------------------------------------------------------------------------------------
def load_config(
    preset: str | None = None,
    overrides: Iterable[str] = (),
    config_file: str | Path | None = None,
) -> SpearConfig:
    """Preset (default ``spear``) <- optional YAML file <- dotted overrides, validated."""
    data: dict[str, Any] = load_preset_dict(preset or "spear")
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist; pass the path of a YAML file of config sections "
                              f"(`spear presets spear` prints one)")
        data = merge_layer(data, load_yaml_with_inheritance(path))
    data = merge_layer(data, parse_overrides(overrides))
    return validate_config(data)


def merge_layer(base: Mapping[str, Any], layer: Mapping[str, Any]) -> dict[str, Any]:
    """``deep_merge``, except that ``env.kwargs`` belong to their environment: a layer that switches
    ``env.name`` to another env drops the kwargs below it (``--env alfworld`` over the TextWorldExpress
    quickstart must not hand TWX's ``game`` to ALFWorld); the layer's own kwargs still apply."""
    env_layer, env_base = layer.get("env"), base.get("env")
    if (isinstance(env_layer, Mapping) and isinstance(env_base, Mapping) and "name" in env_layer
            and env_layer["name"] != env_base.get("name")):  # fmt: skip
        base = {**base, "env": {k: v for k, v in env_base.items() if k != "kwargs"}}
    return deep_merge(base, layer)


def validate_config(data: Mapping[str, Any]) -> SpearConfig:
    """Validate a raw mapping, turning pydantic's report into one readable :class:`ConfigError`."""
    try:
        return SpearConfig.model_validate(dict(data))
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, data)) from None


def all_config_keys(model: type[BaseModel] = SpearConfig, prefix: str = "") -> list[str]:
    """Every dotted key of the schema, e.g. ``actor.policy_loss.clip_cov_ratio``."""
    keys = []
    for name, field in model.model_fields.items():
        dotted = f"{prefix}{name}"
        keys.append(dotted)
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys.extend(all_config_keys(annotation, f"{dotted}."))
    return keys


def nearest_key(bad_key: str) -> str | None:
    """The known dotted key closest to a mistyped one (full path first, then by its last part)."""
    keys = all_config_keys()
    close = difflib.get_close_matches(bad_key, keys, n=1, cutoff=0.75)
    if close:
        return close[0]
    leaf = bad_key.rsplit(".", 1)[-1]
    by_leaf = {k.rsplit(".", 1)[-1]: k for k in keys}
    close = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.75)
    return by_leaf[close[0]] if close else None


def _allowed_values(key: str) -> tuple[Any, ...]:
    """The Literal choices of a dotted key, or () if it is not a Literal."""
    model: Any = SpearConfig
    field = None
    for part in key.split("."):
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return ()
        field = model.model_fields[part]
        model = field.annotation
    if field is None:
        return ()
    choices: list[Any] = []
    for arg in (field.annotation, *get_args(field.annotation)):
        if getattr(arg, "__origin__", None) is not None or str(arg).startswith("typing.Literal"):
            choices.extend(a for a in get_args(arg) if a is not None and not isinstance(a, type))
    return tuple(dict.fromkeys(choices))


def format_validation_error(err: ValidationError, data: Mapping[str, Any]) -> str:
    """One line per problem, each naming the key, the value and the fix."""
    lines = []
    for problem in err.errors():
        loc = [str(p) for p in problem["loc"] if not str(p).startswith("function-after")]
        key = ".".join(loc) or "<config>"
        value = problem.get("input")
        kind = problem["type"]
        if kind == "extra_forbidden":
            close = nearest_key(key)
            hint = f" Did you mean '{close}'?" if close else " See `spear presets --keys` for every key."
            lines.append(f"unknown config key '{key}' (value {value!r}).{hint}")
        elif kind == "literal_error":
            allowed = ", ".join(repr(v) for v in _allowed_values(key)) or problem["msg"]
            lines.append(f"config key '{key}' has the value {value!r}, which is not allowed; allowed values: {allowed}.")
        elif kind == "value_error":  # our cross-field validators name their keys themselves
            lines.append(problem["msg"].removeprefix("Value error, "))
        else:
            msg = problem["msg"].removeprefix("Value error, ")
            lines.append(f"config key '{key}' has the value {value!r}: {msg}.")
    return "invalid configuration:\n  - " + "\n  - ".join(lines)


def config_to_yaml(config: SpearConfig) -> str:
    """The fully resolved config as YAML (what a run records next to its metrics)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
