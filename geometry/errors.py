"""The geometry package's exception: bad arrays or parameters given to a measure, with a message saying what to do."""

from __future__ import annotations

from extraction.errors import ICLGeometryError


class MeasureError(ICLGeometryError):
    """Arrays or parameters that a measure cannot be computed from (a ``ValueError``, as scikit-learn expects)."""
