"""``extract(..., keep="statistics")``: keep running per-layer, per-class statistics of the query states, not the states.

The writer folds each batch's query states into the (block, class) moments of :mod:`geometry.statistics`
(count, mean, centred d x d second moment, per layer; blocks as :func:`geometry.statistics.assign_blocks` deals
them) and writes every other per-example array (labels, predictions, lens tokens ...) as usual. So a run's memory
and store size are fixed in the number of prompts: layers x ``n_blocks`` x classes x d² float64 (Gemma 3 270M,
16 blocks, 2 classes: 19 x 16 x 2 x 640² x 8 B = 2 GB; choose fewer blocks for larger models). With a ``rank`` r,
each unit keeps a rank-r sketch of its second moment instead (:mod:`geometry.sketch`: (r + k) x d per unit, exact
along the k <= 2 x classes label rows, the dropped variance kept as a residual trace; a 7B model, d = 4,096,
r = 32, 2 classes, 33 layers x 16 x 2 units: 1.2 GB).

The statistics arrays (``stat_count``, ``stat_mean``, ``stat_m2``, ``stat_shift``; see
:data:`geometry.statistics.STORED`) are written when the last example is in, and only then are the examples marked
done: an interrupted run leaves no example done and its rerun starts over (nothing lost twice, nothing counted
twice). ``geometry.measure(store, group, engine="statistics")`` reads them directly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from extraction.store import EXAMPLE_CHUNK, GroupWriter, consolidate
from geometry.sketch import ANCHOR_ROWS, SketchAccumulator, orthonormal_rows
from geometry.statistics import Accumulator, assign_blocks

KEEP = ("states", "statistics")


class StatisticsWriter(GroupWriter):
    """A :class:`GroupWriter` that keeps the moments of ``hidden`` instead of ``hidden`` (see the module doc)."""

    def __init__(self, path: str | Path, group: str, config: dict[str, Any], *, labels: np.ndarray,
                 n_classes: int, n_blocks: int, rank: int | None = None, overwrite: bool = False):
        super().__init__(path, group, config, overwrite=overwrite)
        self.n_blocks, self.rank = n_blocks, rank
        blocks = assign_blocks(np.asarray(labels), n_blocks)
        self.accumulator = (Accumulator(blocks, n_blocks, n_classes) if rank is None
                            else SketchAccumulator(blocks, n_blocks, n_classes, rank))

    def create(self, arrays: dict[str, tuple], static: dict[str, np.ndarray], attrs: dict[str, Any],
               example_chunk: int = EXAMPLE_CHUNK) -> None:
        """Create the group with the statistics arrays in place of ``hidden``."""
        _, (_, layers, dim), _ = arrays["hidden"]
        self._anchor({name: value for name, (_, value) in static.items()})
        layout = {name: spec for name, spec in arrays.items() if name != "hidden"}
        layout.update(self.accumulator.layout(layers, dim))
        super().create(layout, static, {**attrs, "keep": "statistics", "n_blocks": self.n_blocks,
                                        "statistics_rank": "full" if self.rank is None else self.rank},
                       example_chunk)

    def write(self, index: np.ndarray, values: dict[str, np.ndarray], *, done: bool = True) -> None:
        """Fold the batch's states into the moments, write its other arrays; on the last batch, the statistics."""
        rest = {name: value for name, value in values.items() if name != "hidden"}
        self._anchor(self.node)
        self.accumulator.add(index, values["hidden"], np.asarray(values["label"]))
        super().write(index, rest, done=False)
        self.remaining -= len(index)
        if self.remaining == 0:
            for name, value in self.accumulator.values().items():
                self.node[name][...] = value
            self.node["done"][...] = True
            consolidate(self.path)

    def _anchor(self, arrays: Any) -> None:
        """Give a low-rank accumulator its anchors, the label rows among ``arrays`` (static arrays or the group)."""
        if self.rank is not None and self.accumulator.anchor is None:
            rows = [np.asarray(arrays[name][...], dtype=np.float64) for name in ANCHOR_ROWS if name in arrays]
            self.accumulator.anchor = orthonormal_rows(np.concatenate(rows)) if rows else None
