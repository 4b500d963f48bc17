"""Typed errors. Every message names the value, what was expected and the fix."""


class CascadeError(ValueError):
    """Base class of every error the pack raises on bad input."""


class CheckpointError(CascadeError):
    """A weights file cannot be read, or its contents are not what the caller asked for."""


class UnknownLayoutError(CheckpointError):
    """A state dict matches none of the known key layouts."""


class StageMismatchError(CascadeError):
    """A tensor or model of one stage was given where another stage is expected."""


class WrongModelError(CheckpointError, StageMismatchError):
    """A readable file of another kind was given to a loader (a Stage B to the Stage C loader, ...).

    ``found`` is the kind the file holds (a ``cascade.kinds`` name, or "packaged" for a multi-model file), so
    a front end can add which of its own loaders reads it.
    """

    def __init__(self, message: str, found: str | None = None) -> None:
        super().__init__(message)
        self.found = found


class ShapeError(CascadeError):
    """A tensor has a shape the receiving network cannot use."""


class SamplingInterrupted(RuntimeError):
    """The user stopped sampling; models are left loaded and unpatched, nothing half-done."""
