"""Shared set-up for the spear_kernels tests.

TRITON_INTERPRET is set by tests/conftest.py before any module imports spear_kernels (and again here,
for runs that point pytest at this folder with another rootdir). If the package is not installed yet,
the repository's kernels/ folder is loaded under the name ``spear_kernels`` (setup.py's package_dir).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util
import sys

import pytest
import torch

try:
    import spear_kernels  # noqa: F401
except ImportError:  # not installed: map kernels/ -> spear_kernels like setup.py's package_dir
    _root = os.path.join(os.path.dirname(__file__), "..", "..", "kernels")
    _spec = importlib.util.spec_from_file_location(
        "spear_kernels", os.path.join(_root, "__init__.py"), submodule_search_locations=[_root]
    )
    _mod = importlib.util.module_from_spec(_spec)
    sys.modules["spear_kernels"] = _mod
    _spec.loader.exec_module(_mod)

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover
    HAS_TRITON = False

# The Triton kernels run on CPU tensors only under the interpreter; on a CUDA machine they run natively.
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="no triton"))]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max |b| in fp32 (gradients of very different magnitudes in one test)."""
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
