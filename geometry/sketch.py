"""Low-rank sufficient statistics: a rank-r sketch of each unit's second moment, for wide models and many blocks.

The full statistics of :mod:`geometry.statistics` keep a d x d second moment per (block, class) unit and layer; for
d = 4,096 that is 134 MB a unit. A *sketch* keeps, per unit and layer, the count n, the mean μ (of the shifted
states), a factor F (r x d) with M ≈ FᵀF (the top-r principal directions scaled by the square roots of their
second moments), the residual trace ρ = tr M - |F|² (so the total variance is kept exactly) and, exactly, the
products M Aᵀ (d x k) with an orthonormal basis A of the label rows' span (the *anchors*: the ``unembed`` and
``lens_unembed`` rows, k <= 2 x classes). A sketch costs (r + k) x d a unit.

Streaming update (incremental PCA): a chunk's rows of a unit, centred on their mean μ_b, are stacked under the
unit's factor together with the between-means row sqrt(n_a n_b / n) (μ_b - μ_a) (Chan et al.'s merge, as in
:func:`geometry.statistics.merge`); the stack's top-r right singular directions become the new factor and the
energy of the others moves into ρ. M Aᵀ is merged exactly by the same update. While a unit's second moment has
rank <= r (e.g. blocks of at most r + 1 queries, or d <= r) nothing is dropped and the sketch is exact.

Reading (:func:`in_basis`): the second moment is taken as M̃ = P FᵀF P + (MAᵀ)A + Aᵀ(AM) - Aᵀ(AMAᵀ)A with
P = I - AᵀA, exact on and across the anchor span, and expressed with the means in an orthonormal basis of their
joint span (at most units x (r + k + 1) + classes directions), giving ordinary
:class:`geometry.statistics.Moments` with the residuals tr M - tr M̃ attached; the measures of
:mod:`geometry.statistics` run on them unchanged:

* count, mean and trace are exact, so output alignment is exact and the normalisation of variance alignment
  includes every direction;
* variance, mean and composite alignment need the second moment only along label-pair directions, which lie in
  the anchor span: exact at any rank;
* singular alignment takes the top eigenvectors of M̃ (approximate when ρ > 0: good when the top of the spectrum
  is captured, i.e. r well above 2);
* effective dimension tr(M)² / tr(M²) has its numerator exact and spreads the residual evenly over the
  directions outside the basis for the denominator (approximate when ρ > 0: an upper value if the residual lies
  outside the basis, where an even spread is the flattest spectrum it can have).

Tested (``tests/geometry/test_statistics_sketch.py``): equal to the full moments to 1e-6 when nothing is dropped;
on a decaying spectrum with 5% of the trace dropped, the alignments to 1e-6 and singular alignment and effective
dimension to 1%.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from geometry.kernels import RANK_TOLERANCE
from geometry.statistics import Accumulator, Moments

#: Arrays of a low-rank statistics group: name -> dims (``rank``: the sketch's factor rows; ``anchor``: the
#: orthonormal basis of the label rows' span, along which the second moment is kept exactly).
STORED = {
    "stat_count": ("layer", "resample_block", "class"),
    "stat_mean": ("layer", "resample_block", "class", "dim"),
    "stat_factor": ("layer", "resample_block", "class", "rank", "dim"),
    "stat_residual": ("layer", "resample_block", "class"),
    "stat_cross": ("layer", "resample_block", "class", "dim", "anchor"),
    "stat_anchor": ("anchor", "dim"),
    "stat_shift": ("layer", "dim"),
}

#: The label rows whose span the sketch keeps exactly (the alignment directions of either ``unembedding``).
ANCHOR_ROWS = ("unembed", "lens_unembed")


def orthonormal_rows(rows: np.ndarray) -> np.ndarray:
    """An orthonormal basis (k, d) of the span of ``rows`` (null directions dropped)."""
    _, singular, vt = np.linalg.svd(np.asarray(rows, dtype=np.float64), full_matrices=False)
    return vt[singular > max(RANK_TOLERANCE * singular[:1].max(initial=0.0), 0.0)]


@dataclass(frozen=True)
class Sketch:
    """Counts (..., G, m), means (..., G, m, d), factors (..., G, m, r, d), residual traces (..., G, m) (tr M - |F|²)
    and exact products M Aᵀ (..., G, m, d, k) with the anchor basis A (k, d) of every (block, class) unit; leading
    axes (e.g. ``layer``) are carried through unchanged."""

    count: np.ndarray
    mean: np.ndarray
    factor: np.ndarray
    residual: np.ndarray
    cross: np.ndarray
    anchor: np.ndarray


def truncate(stack: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``rank`` factor (L, rank, d) of stacked rows (L, k, d), so that stackᵀstack ≈ factorᵀfactor, and the
    dropped energy (L,) (the squared singular values past ``rank``)."""
    _, singular, vt = np.linalg.svd(stack, full_matrices=False)
    kept = min(rank, singular.shape[1])
    factor = np.zeros((stack.shape[0], rank, stack.shape[2]))
    factor[:, :kept] = singular[:, :kept, None] * vt[:, :kept]
    return factor, (singular[:, kept:] ** 2).sum(axis=1)


class SketchAccumulator(Accumulator):
    """:class:`geometry.statistics.Accumulator` keeping a rank-``rank`` sketch per unit (see the module doc), exact
    along the span of ``anchors`` (label rows; set before the first :meth:`add`, or none)."""

    def __init__(self, blocks: np.ndarray, n_blocks: int, n_classes: int, rank: int,
                 anchors: np.ndarray | None = None):
        super().__init__(blocks, n_blocks, n_classes)
        self.rank = rank
        self.anchor = None if anchors is None else orthonormal_rows(anchors)

    def empty(self, n_layers: int, dim: int) -> Sketch:
        shape = (n_layers, self.n_blocks, self.n_classes)
        anchor = np.zeros((0, dim)) if self.anchor is None else self.anchor
        return Sketch(np.zeros(shape), np.zeros((*shape, dim)), np.zeros((*shape, self.rank, dim)),
                      np.zeros(shape), np.zeros((*shape, dim, len(anchor))), anchor)

    def fold(self, g: int, c: int, rows: np.ndarray) -> None:
        total = self.moments
        n_a, n_b = total.count[:, g, c], float(len(rows))
        n = n_a + n_b
        mean_b = rows.mean(axis=0)
        delta = mean_b - total.mean[:, g, c]
        between = np.sqrt(n_a * n_b / n)[:, None, None] * delta[:, None, :]
        centred = (rows - mean_b).transpose(1, 0, 2)  # (L, n_b, d)
        stack = np.concatenate([total.factor[:, g, c], centred, between], axis=1)
        total.factor[:, g, c], dropped = truncate(stack, self.rank)
        A = total.anchor
        total.cross[:, g, c] += (centred.transpose(0, 2, 1) @ (centred @ A.T)
                                 + (n_a * n_b / n)[:, None, None] * delta[:, :, None] * (delta @ A.T)[:, None, :])
        total.residual[:, g, c] += dropped
        total.mean[:, g, c] += delta * (n_b / n)[:, None]
        total.count[:, g, c] = n

    def layout(self, n_layers: int, dim: int) -> dict[str, tuple]:
        sizes = {"layer": n_layers, "resample_block": self.n_blocks, "class": self.n_classes, "rank": self.rank,
                 "dim": dim, "anchor": 0 if self.anchor is None else len(self.anchor)}
        return {name: (dims, tuple(sizes[d] for d in dims), "float64") for name, dims in STORED.items()}

    def values(self) -> dict[str, np.ndarray]:
        sketch = self.moments
        return {"stat_count": sketch.count, "stat_mean": sketch.mean, "stat_factor": sketch.factor,
                "stat_residual": sketch.residual, "stat_cross": sketch.cross, "stat_anchor": sketch.anchor,
                "stat_shift": self.shift}


def in_basis(sketch: Sketch, label_rows: np.ndarray | None) -> tuple[Moments, np.ndarray | None]:
    """One layer's sketch (units (G, m)) as :class:`Moments` in an orthonormal basis of the span of its means,
    factors, exact anchor products and ``label_rows`` (m, d), with the residual traces attached; and the label rows
    in that basis.

    With anchor basis A and P = I - AᵀA, the second moment is read as M̃ = P FᵀF P + (MAᵀ)A + Aᵀ(AM) - Aᵀ(AMAᵀ)A:
    exact on and across the anchor span, the factor's elsewhere; the residual is tr M - tr M̃.
    """
    dim = sketch.mean.shape[-1]
    A, cross = sketch.anchor, sketch.cross
    outer = sketch.factor - (sketch.factor @ A.T) @ A  # F P
    columns = np.swapaxes(cross, -1, -2)  # (G, m, k, d): the rows of (MAᵀ)ᵀ
    spanning = [sketch.mean.reshape(-1, dim), outer.reshape(-1, dim), A, columns.reshape(-1, dim)]
    if label_rows is not None:
        spanning.append(np.asarray(label_rows, dtype=np.float64))
    basis = orthonormal_rows(np.concatenate(spanning))
    f, a, x = outer @ basis.T, A @ basis.T, columns @ basis.T
    inner = A @ cross  # A M Aᵀ (G, m, k, k)
    mixed = np.einsum("gcjK,jL->gcKL", x, a)
    m2 = (np.einsum("gcrK,gcrL->gcKL", f, f) + mixed + np.swapaxes(mixed, -1, -2)
          - np.einsum("jK,gcjl,lL->gcKL", a, inner, a))
    total = np.einsum("gcri,gcri->gc", sketch.factor, sketch.factor) + sketch.residual
    residual = total - np.trace(m2, axis1=-2, axis2=-1)
    moments = Moments(sketch.count, sketch.mean @ basis.T, m2, residual=residual, outside=dim - len(basis))
    return moments, None if label_rows is None else label_rows @ basis.T


def read_layer(ds: Any, layer: int, label_rows: np.ndarray | None) -> tuple[Moments, np.ndarray | None]:
    """One layer's moments (and label rows) from a low-rank statistics group (an xarray Dataset)."""
    one = ds[["stat_count", "stat_mean", "stat_factor", "stat_residual", "stat_cross"]].sel(layer=layer)
    sketch = Sketch(one["stat_count"].values, one["stat_mean"].values, one["stat_factor"].values,
                    one["stat_residual"].values, one["stat_cross"].values, ds["stat_anchor"].values)
    return in_basis(sketch, label_rows)
