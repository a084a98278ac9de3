"""The heads package's exception: every mistake a user can make with heads, sets or interventions raises it."""

from __future__ import annotations

from extraction.errors import ICLGeometryError


class HeadsError(ICLGeometryError):
    """A head set, intervention, score request or sweep that cannot run as asked; the message says what to change."""
