"""Errors that are the user's to fix: the ``spear`` command prints them as one paragraph, exit status 2.

Kept apart from :mod:`spear_engine.cli` so that the command implementations (:mod:`spear_engine.commands`)
raise them without importing the command line.
"""

from __future__ import annotations


class UserError(Exception):
    """An error the user can fix; printed without a stack trace."""


def user_error_types() -> tuple[type[BaseException], ...]:
    """Errors raised deeper down that are the user's to fix (a missing model, a bad checkpoint, ...)."""
    from spear_engine.models import ModelNotFoundError
    from spear_engine.train.checkpoint import CheckpointError
    from spear_engine.train.trainer import TrainingHalted

    return (ModelNotFoundError, CheckpointError, TrainingHalted, FileNotFoundError)
