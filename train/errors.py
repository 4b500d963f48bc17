"""Errors of the training package. Every message names the value, what was expected and the fix."""

from __future__ import annotations

from ..cascade.errors import CascadeError


class TrainingInputError(CascadeError):
    """Bad training input: a dataset, a setting, a resume state that does not fit (a ValueError)."""


class TrainingOutOfMemory(TrainingInputError):
    """A training step did not fit in memory; the message lists what to lower."""
