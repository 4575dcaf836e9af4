"""Replay state built directly for the trainer tests, instead of hoping that a tiny random model wins.

The tiny model's samples depend on the CPU (its GEMMs round differently on different vector units), so
which episodes it wins differs between machines. Tests that need a non-empty replay buffer, or a replay
draw, admit these rows themselves; the same rows on every machine.
"""

from __future__ import annotations

import numpy as np

from spear_engine.algorithms.self_imitation import MASK_ATTENTION, MASK_RESPONSE, SelfImitation, SILBatch


def winning_rows(n: int = 8, length: int = 5, vocab: int = 50) -> SILBatch:
    """``n`` rows of ``length`` trainable tokens (ids below ``vocab``), each its own group and trajectory,
    with score 100 and advantage 1: admitted by every admission rule."""
    both = MASK_ATTENTION | MASK_RESPONSE
    return SILBatch(
        tokens=np.arange(n * length, dtype=np.int32) % vocab,
        logp=-np.linspace(0.1, 1.0, n * length, dtype=np.float32),
        mask=np.full(n * length, both, dtype=np.uint8),
        lengths=np.full(n, length, dtype=np.int32),
        group_ids=np.arange(n) + 10_000,
        traj_ids=np.arange(n) + 10_000,
        scores=np.full(n, 100.0),
        advantages=np.ones(n),
    )


def admit_winning_rows(sil: SelfImitation, step: int, n: int = 8) -> None:
    """Admit :func:`winning_rows` at ``step`` with a zero baseline pushed beside them, so that every row
    beats the P50 baseline (recalibrated advantage 100 > 0) and a draw follows at the next step under
    both replay triggers (``n`` > 1.5 x the buffer size fires the official one)."""
    metrics = sil.update(step, winning_rows(n), baseline=(np.zeros(n), np.zeros(n)))
    assert metrics["replay/admitted_rows"] == n, metrics
