"""``import_spear_kernels()`` for the bench scripts, which run from a checkout with or without the
package installed."""

from __future__ import annotations

import os
import sys
from types import ModuleType

KERNELS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "kernels")


def import_spear_kernels() -> ModuleType:
    """The installed package, else the repository's kernels/ folder loaded under that name."""
    try:
        import spear_kernels
    except ImportError:
        import importlib.util

        spec = importlib.util.spec_from_file_location(
            "spear_kernels", os.path.join(KERNELS_DIR, "__init__.py"), submodule_search_locations=[KERNELS_DIR]
        )
        spear_kernels = importlib.util.module_from_spec(spec)
        sys.modules["spear_kernels"] = spear_kernels
        spec.loader.exec_module(spear_kernels)
    return spear_kernels
