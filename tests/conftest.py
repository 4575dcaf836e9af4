"""Session-wide test set-up, loaded before any test module.

Triton decides at ``@triton.jit`` decoration time whether a kernel runs under its CPU interpreter, so
``TRITON_INTERPRET`` has to be in the environment before the first import of ``spear_kernels``. Test
modules outside ``tests/kernels`` (dispatch, trainer, faults) import it too, and they are collected
first; setting the variable in ``tests/kernels/conftest.py`` alone is therefore too late. An explicit
``TRITON_INTERPRET=0`` (a GPU machine running the kernels natively) is kept.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
