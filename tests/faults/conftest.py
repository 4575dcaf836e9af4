"""Fault tests: offline, one torch thread (these tests are about behaviour, not speed; on a shared 2-core
machine two threads that contend with another job make a tiny training step ~30x slower). Child
processes get ``OMP_NUM_THREADS=1`` from :func:`fault_helpers.child_env`."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import fault_helpers
import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _clean_fault_plan():
    """Every test starts with no injected env faults and ends with hung env calls released."""
    fault_helpers.reset_faults()
    yield
    fault_helpers.reset_faults()
