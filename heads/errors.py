"""The heads package's exception: every mistake a user can make with heads, sets or interventions raises it."""

from __future__ import annotations

from extraction.errors import GroupClashError, ICLGeometryError


class HeadsError(ICLGeometryError):
    """A head set, intervention, score request or sweep that cannot run as asked; the message says what to change."""


class ScoresClashError(HeadsError, GroupClashError):
    """Head scores saved in the store with another configuration (a caller such as the study may replace them)."""
