"""Session-wide test set-up, loaded before any test module.

Triton decides at ``@triton.jit`` decoration time whether a kernel runs under its CPU interpreter, so
``TRITON_INTERPRET`` has to be in the environment before the first import of ``spear_kernels``. Test
modules outside ``tests/kernels`` (dispatch, trainer, faults) import it too, and they are collected
first; setting the variable in ``tests/kernels/conftest.py`` alone is therefore too late. An explicit
``TRITON_INTERPRET=0`` (a GPU machine running the kernels natively) is kept.

``SPEAR_KERNELS_POISON=1``: the whole suite runs with the kernels' debug switch on, so every scratch
buffer they allocate starts as NaN of a known bit pattern and each kernel's outputs are checked for
elements it never wrote (see ``spear_kernels.utils.scratch``). A read of unwritten memory then fails
every run instead of one run in a few. ``SPEAR_KERNELS_POISON=0`` turns it off.

``SPEAR_ROLLOUT_AUTO=hf``: ``rollout.name=auto`` (the default) picks HF generation in tests, so a test
that does not name an engine runs the same whether or not vLLM is installed.

``one_torch_thread``: a fixture for tests about values that train a tiny model in-process (use it with
``pytest.mark.usefixtures``); on a shared 2-core machine two contending torch threads make a tiny step
many times slower.
"""

import os

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("SPEAR_KERNELS_POISON", "1")
os.environ.setdefault("SPEAR_ROLLOUT_AUTO", "hf")  # tests that want vLLM name it (rollout.name=vllm)


@pytest.fixture
def one_torch_thread():
    """torch runs on one thread during the test; the thread count is restored after it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
