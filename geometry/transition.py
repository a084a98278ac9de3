"""The transition layer of [Y]: where separability has plateaued and directional alignment then surges.

Method (all choices are parameters, recorded in the result):

1. plateau layer = the first layer whose separability reaches ``plateau`` (default 0.95) times its maximum over
   the measured layers;
2. the alignment curve (``alignment``, default ``composite_alignment``) is optionally smoothed with a centred
   moving average of ``smooth`` layers (default 1: none);
3. transition layer = the layer l >= plateau layer with the largest forward difference a[l+1] - a[l], i.e. the
   alignment surges between l and the next measured layer. None when no forward difference exists after the
   plateau or none of them exceeds ``min_rise`` (default 0: any rise; no surge is what zero-shot prompts should
   show). The size of the surge is reported as ``rise``, so a nominal transition (a tiny rise) can be told apart
   from the paper's surge; ``min_rise`` (in the alignment's units) turns such small rises into "no transition".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np

from geometry.errors import MeasureError
from geometry.validation import check_int

if TYPE_CHECKING:
    import xarray as xr


@dataclass(frozen=True)
class Transition:
    """A group's transition: the layer (None if no surge), the plateau layer, the size of the surge, and how."""

    group: str
    layer: int | None
    plateau_layer: int | None
    rise: float
    alignment: str
    method: str

    def to_dict(self) -> dict:
        return asdict(self)


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average over ``window`` points, shrinking the window at the ends."""
    if window == 1:
        return values
    half = window // 2
    return np.array([np.nanmean(values[max(0, i - half):i + half + 1]) for i in range(len(values))])


def transition(result: xr.Dataset, *, plateau: float = 0.95, alignment: str = "composite_alignment",
               smooth: int = 1, min_rise: float = 0.0) -> Transition:
    """The transition of one sweep result (:func:`geometry.measure`); see the module docstring for the method."""
    if not 0 < plateau <= 1:
        raise MeasureError(f"plateau must be in (0, 1], not {plateau!r}")
    smooth = check_int(smooth, "smooth", 1)
    if not np.isfinite(min_rise) or min_rise < 0:
        raise MeasureError(f"min_rise must be a finite number >= 0, not {min_rise!r}")
    missing = [m for m in ("separability", alignment) if m not in result["measure"].values]
    if missing:
        raise MeasureError(f"transition needs the measures {', '.join(missing)} in the sweep result")
    layers = result["layer"].values
    separation = result["value"].sel(measure="separability").values
    curve = _smooth(result["value"].sel(measure=alignment).values, smooth)
    method = (f"plateau: first layer with separability >= {plateau:g} x its max; transition: layer l >= plateau "
              f"with the largest forward difference of {alignment}"
              f"{f' (moving average over {smooth} layers)' if smooth > 1 else ''}, a[l+1] - a[l] > {min_rise:g}")
    group = str(result.attrs.get("group", ""))
    reached = np.flatnonzero(separation >= plateau * np.nanmax(separation)) if np.isfinite(separation).any() else []
    if len(reached) == 0:
        return Transition(group, None, None, np.nan, alignment, method)
    start = int(reached[0])
    steps = np.diff(curve[start:])
    if len(steps) == 0 or not np.nanmax(steps, initial=-np.inf) > min_rise:
        return Transition(group, None, int(layers[start]), np.nan, alignment, method)
    best = start + int(np.nanargmax(steps))
    return Transition(group, int(layers[best]), int(layers[start]), float(steps[best - start]), alignment, method)
