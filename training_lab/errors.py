"""The lab's exception: every mistake a user can make with a lab config, hook point, run store or training run."""

from __future__ import annotations

from extraction.errors import ICLGeometryError


class LabError(ICLGeometryError):
    """A lab setting, hook point or run that cannot go ahead as asked; the message says what to change."""


class NonFiniteLossError(LabError):
    """Training produced a non-finite loss; ``step`` is the failing step, ``checkpoint`` the last good one (or None)."""

    def __init__(self, message: str, *, step: int, checkpoint: str | None):
        super().__init__(message)
        self.step, self.checkpoint = step, checkpoint
