"""Shared helpers for the algorithm tests: the verl 0.9.1 loader used by the live parity test."""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import pytest

VERL_SRC = os.environ.get("VERL_SRC", "/tmp/verl_src")
VERL_DEPS = os.environ.get("VERL_DEPS", "/tmp/verl_deps")


def _load_verl():
    """Import verl's core_algos / torch_functional without its package __init__ (see
    scripts/make_verl_fixtures.py for the setup). Raises ImportError with a reason."""
    if not (Path(VERL_SRC) / "verl" / "trainer" / "ppo" / "core_algos.py").exists():
        raise ImportError(f"verl sources not found under VERL_SRC={VERL_SRC}")
    if Path(VERL_DEPS).is_dir() and VERL_DEPS not in sys.path:
        sys.path.append(VERL_DEPS)
    if "verl" not in sys.modules:
        package = types.ModuleType("verl")
        package.__path__ = [str(Path(VERL_SRC) / "verl")]
        sys.modules["verl"] = package
    import verl.trainer.ppo.core_algos as core_algos
    import verl.utils.torch_functional as torch_functional
    from omegaconf import OmegaConf

    return core_algos, torch_functional, OmegaConf


@pytest.fixture(scope="session")
def verl():
    """(core_algos, torch_functional, OmegaConf) of verl 0.9.1, or skip with the reason."""
    try:
        return _load_verl()
    except Exception as exc:  # any import failure means "verl not available here"
        reason = f"verl 0.9.1 not importable ({type(exc).__name__}: {exc}); live parity skipped"
        print(reason)
        pytest.skip(reason)
