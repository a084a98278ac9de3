"""Sufficient statistics of query states, per layer, block and class: the measures of stores larger than memory.

Every measure of [Y] that is a function of class means and covariances (variance, mean and composite alignment,
singular alignment, effective dimension) and the output-alignment counts are computed here from per-unit moments,
never from a whole layer of states. A *unit* is one (block, class) cell: the examples of each class are dealt, in
example order, into ``n_blocks`` blocks of near-equal size (:func:`assign_blocks`), and each unit keeps

* its count n, its mean μ (of the states minus a per-layer ``shift``, the layer's first state, so identical states
  give exact zeros as in :mod:`geometry.kernels`) and its centred second moment M = Σ (x - μ)(x - μ)ᵀ (d x d).

Units are accumulated chunk by chunk along ``example`` and combined with the pairwise update of Chan, Golub and
LeVeque (1979): n = n_a + n_b, δ = μ_b - μ_a, μ = μ_a + δ n_b / n, M = M_a + M_b + δδᵀ n_a n_b / n, which is
exact in exact arithmetic and numerically stable (no large raw sums are subtracted). The accumulation runs as a
Dask graph (one task per stored chunk, a binary tree of merges; any scheduler, a ``dask.distributed`` cluster
included) when the store is opened with Dask, and as a plain loop over chunks otherwise
(:class:`Accumulator`, also what ``extract(..., keep="statistics")`` uses while it runs).

Bootstrap that scales: a resample draws, within each class, its non-empty blocks with replacement (a stratified
block bootstrap); the resample's statistics are weighted sums of the units' statistics, so the cost is independent
of the number of examples (B x units x d² per layer). With blocks of one example (``n_blocks`` >= the largest
class) it is the in-memory stratified bootstrap of :mod:`geometry.bootstrap` exactly in distribution; with larger
blocks it resamples blocks of i.i.d. queries, which estimates the same spread with fewer degrees of freedom
(about ``n_blocks`` per class). Singular alignment of a resample is solved in the span of the pair's top
``subspace`` principal directions, as in the in-memory sweep; the value itself is exact.

Memory: units x d² float64 per layer (``n_blocks`` x classes x d² x 8 bytes), whatever the number of examples;
each Dask chunk task holds one such set too (d = 4,096, 16 blocks, 2 classes: 4.3 GB), so lower ``n_blocks`` for
wide models, or keep rank-r sketches instead (:mod:`geometry.sketch`, written by ``extract(..., keep="statistics",
statistics_rank=r)``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from scipy.linalg import eigh

from geometry.kernels import RANK_TOLERANCE, pair_directions
from geometry.validation import label_pairs

#: Default number of blocks per class (the bootstrap's resampling units; memory grows with it).
N_BLOCKS = 16


# --- moments and their merge ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Moments:
    """Counts (..., G, m), means (..., G, m, d) of the shifted states and centred second moments (..., G, m, d, d)
    of every (block, class) unit; leading axes (e.g. ``layer``) are carried through unchanged."""

    count: np.ndarray
    mean: np.ndarray
    m2: np.ndarray
    #: Per unit (..., G, m): second-moment trace the moments leave out (a low-rank sketch's dropped variance, see
    #: :mod:`geometry.sketch`), modelled as spread evenly over ``outside`` directions orthogonal to ``m2``'s space.
    residual: np.ndarray | None = None
    outside: int = 0

    @property
    def dropped(self) -> np.ndarray:
        """The residual trace of every unit (zeros for exact moments)."""
        return np.zeros(self.count.shape) if self.residual is None else self.residual

    @classmethod
    def zeros(cls, lead: tuple[int, ...], n_blocks: int, n_classes: int, dim: int) -> "Moments":
        shape = (*lead, n_blocks, n_classes)
        return cls(np.zeros(shape), np.zeros((*shape, dim)), np.zeros((*shape, dim, dim)))


def merge(a: Moments, b: Moments) -> Moments:
    """The moments of the union of two disjoint sets of examples (Chan et al.'s pairwise update, unit by unit)."""
    n = a.count + b.count
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.where(n > 0, b.count / n, 0.0)
        cross = np.where(n > 0, a.count * b.count / n, 0.0)
    delta = b.mean - a.mean
    return Moments(n, a.mean + delta * share[..., None],
                   a.m2 + b.m2 + delta[..., :, None] * delta[..., None, :] * cross[..., None, None])


def tree_merge(parts: Sequence[Any], combine: Callable[[Any, Any], Any] = merge) -> Any:
    """Combine ``parts`` pairwise in a balanced binary tree (depth log2 of their number)."""
    parts = list(parts)
    while len(parts) > 1:
        paired = [combine(parts[i], parts[i + 1]) for i in range(0, len(parts) - 1, 2)]
        parts = paired + ([parts[-1]] if len(parts) % 2 else [])
    return parts[0]


def assign_blocks(labels: np.ndarray, n_blocks: int) -> np.ndarray:
    """Block of each example: the examples of each class, in order, dealt into ``n_blocks`` near-equal runs."""
    blocks = np.zeros(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        blocks[rows] = np.arange(len(rows)) * n_blocks // len(rows)
    return blocks


def unit_rows(X: np.ndarray, labels: np.ndarray, blocks: np.ndarray) -> Iterator[tuple[int, int, np.ndarray]]:
    """The rows (n_u, L, d) of each (block, class) unit present in states ``X`` (n, L, d)."""
    for g, c in sorted(set(zip(blocks.tolist(), labels.tolist()))):
        yield g, c, X[(blocks == g) & (labels == c)]


def row_moments(rows: np.ndarray) -> Moments:
    """The moments (leading axis: layer) of one unit's rows (n_u, L, d)."""
    mean = rows.mean(axis=0)
    centred = rows - mean
    by_layer = centred.transpose(1, 0, 2)  # (L, n_u, d): one matrix product per layer
    return Moments(np.full(rows.shape[1], float(len(rows))), mean, by_layer.transpose(0, 2, 1) @ by_layer)


def _units(X: np.ndarray, labels: np.ndarray, blocks: np.ndarray) -> Iterator[tuple[int, int, Moments]]:
    """The moments (leading axis: layer) of each (block, class) unit present in shifted states ``X`` (n, L, d)."""
    for g, c, rows in unit_rows(X, labels, blocks):
        yield g, c, row_moments(rows)


def chunk_moments(H: np.ndarray, labels: np.ndarray, blocks: np.ndarray, shift: np.ndarray, n_blocks: int,
                  n_classes: int) -> Moments:
    """Moments of one chunk of states ``H`` (n, L, d) per layer and unit (``shift`` (L, d) is subtracted first)."""
    X = np.asarray(H, dtype=np.float64) - shift
    out = Moments.zeros((X.shape[1],), n_blocks, n_classes, X.shape[2])
    for g, c, unit in _units(X, labels, blocks):
        out.count[:, g, c], out.mean[:, g, c], out.m2[:, g, c] = unit.count, unit.mean, unit.m2
    return out


class Accumulator:
    """Running moments of a stream of chunks in fixed memory: ``add`` each chunk, read ``moments`` at the end.

    ``blocks`` gives every example's block (see :func:`assign_blocks`), indexed by the example positions passed to
    :meth:`add`; the first chunk's first state of each layer becomes the ``shift``. Only the units a chunk touches
    are updated (in place), so a chunk costs its own size, not the size of all units. :meth:`layout` and
    :meth:`values` give the arrays a statistics group stores (see :data:`STORED`).
    """

    def __init__(self, blocks: np.ndarray, n_blocks: int, n_classes: int):
        self.blocks, self.n_blocks, self.n_classes = blocks, n_blocks, n_classes
        self.shift: np.ndarray | None = None
        self.moments: Any = None

    def add(self, index: np.ndarray, H: np.ndarray, labels: np.ndarray) -> None:
        """Fold in the states ``H`` (n, L, d) of the examples at positions ``index`` with classes ``labels``."""
        X = np.asarray(H, dtype=np.float64)
        if self.moments is None:
            self.shift = X[0].copy()
            self.moments = self.empty(X.shape[1], X.shape[2])
        for g, c, rows in unit_rows(X - self.shift, labels, self.blocks[index]):
            self.fold(g, c, rows)

    def empty(self, n_layers: int, dim: int) -> Moments:
        """The statistics of no examples."""
        return Moments.zeros((n_layers,), self.n_blocks, self.n_classes, dim)

    def fold(self, g: int, c: int, rows: np.ndarray) -> None:
        """Merge the rows (n_u, L, d) of unit (g, c) into its running statistics, in place."""
        total = self.moments
        new = merge(Moments(total.count[:, g, c], total.mean[:, g, c], total.m2[:, g, c]), row_moments(rows))
        total.count[:, g, c], total.mean[:, g, c], total.m2[:, g, c] = new.count, new.mean, new.m2

    def layout(self, n_layers: int, dim: int) -> dict[str, tuple]:
        """(dims, shape, dtype) of each array the statistics group stores."""
        return stored_layout(n_layers, self.n_blocks, self.n_classes, dim)

    def values(self) -> dict[str, np.ndarray]:
        """The stored arrays' values, once every example is in."""
        return stored_values(self.moments, self.shift)


# --- one layer's statistics from a store ---------------------------------------------------------------------------

def is_dask(data: Any) -> bool:
    try:
        import dask.array as da
    except ImportError:
        return False
    return isinstance(data, da.Array)


def reduce_hidden(hidden: Any, labels: np.ndarray, blocks: np.ndarray, n_blocks: int, n_classes: int,
                  chunk: int = 512) -> tuple[Moments, np.ndarray]:
    """Moments and shift of states ``hidden`` (an xarray DataArray (example, layer, dim), lazy or not).

    Dask-backed: one task per stored chunk along ``example`` and a tree of :func:`merge` tasks, computed by the
    current Dask scheduler (a ``dask.distributed`` client when one is active); only the units' moments travel.
    Otherwise the chunks of ``chunk`` examples are read and folded in one after another.
    """
    shift = np.asarray(hidden.isel(example=0).values, dtype=np.float64)
    args = (n_blocks, n_classes)
    if is_dask(hidden.data):
        import dask

        data = hidden.data.rechunk({1: -1, 2: -1})
        stops = np.cumsum(data.chunks[0])
        starts = stops - np.array(data.chunks[0])
        parts = [dask.delayed(chunk_moments)(piece, labels[a:b], blocks[a:b], shift, *args)
                 for piece, a, b in zip(data.to_delayed().ravel(), starts, stops)]
        (moments,) = dask.compute(tree_merge(parts, dask.delayed(merge)))
        return moments, shift
    n = hidden.sizes["example"]
    parts = (chunk_moments(hidden.isel(example=slice(a, a + chunk)).values, labels[a:a + chunk],
                           blocks[a:a + chunk], shift, *args) for a in range(0, n, chunk))
    moments = None
    for part in parts:
        moments = part if moments is None else merge(moments, part)
    return moments, shift


def unit_hits(hits: np.ndarray, labels: np.ndarray, blocks: np.ndarray, n_blocks: int, n_classes: int) -> np.ndarray:
    """Per (block, class) unit: how many of its queries the logit lens gets right (a sum, like a count)."""
    out = np.zeros((n_blocks, n_classes))
    np.add.at(out, (blocks, labels), hits.astype(float))
    return out


# --- resampling weights --------------------------------------------------------------------------------------------

def block_weights(count: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(1 + n_boot, G, m) unit weights: a row of ones, then stratified block-bootstrap resamples (within each
    class, its non-empty blocks drawn with replacement as many times as there are of them)."""
    weights = np.zeros((1 + n_boot, *count.shape))
    weights[0] = 1.0
    for c in range(count.shape[1]):
        filled = np.flatnonzero(count[:, c] > 0)
        if len(filled):
            weights[1:, filled, c] = rng.multinomial(len(filled), np.full(len(filled), 1.0 / len(filled)),
                                                     size=n_boot)
    return weights


# --- the measures --------------------------------------------------------------------------------------------------

def _pooled(n: np.ndarray, mean: np.ndarray, m2: np.ndarray, weights: np.ndarray):
    """Weighted union of units: n (U,), mean (U, k), m2 (U, k, k), weights (B, U) -> N (B,), mean (B, k) and
    centred second moment (B, k, k), all relative to the units' plain pooled mean (small cancellation)."""
    reference = n @ mean / max(n.sum(), 1.0)
    centred = mean - reference
    wn = weights * n
    total = wn.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        mu = wn @ centred / total[:, None]
    raw = np.einsum("bu,ukl->bkl", weights, m2) + np.einsum("bu,uk,ul->bkl", wn, centred, centred)
    return total, mu + reference, raw - total[:, None, None] * mu[:, :, None] * mu[:, None, :]


def _pair_units(moments: Moments, a: int, b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The units of classes a and b of one layer, flattened: n, mean, m2 and each unit's class (a or b)."""
    n = moments.count[:, [a, b]].T.reshape(-1)
    mean = moments.mean[:, [a, b]].transpose(1, 0, 2).reshape(len(n), -1)
    m2 = moments.m2[:, [a, b]].transpose(1, 0, 2, 3).reshape(len(n), *moments.m2.shape[-2:])
    side = np.repeat([0, 1], moments.count.shape[0])
    return n, mean, m2, side


def directed_alignment(moments: Moments, directions: np.ndarray, pairs: list[tuple[int, int]],
                       weights: np.ndarray, normalize: bool = True) -> dict[str, np.ndarray]:
    """Variance, mean and composite alignment (B, P) from one layer's unit moments and (B, G, m) unit weights;
    definitions as in :func:`geometry.kernels.alignment_batch`."""
    out = {key: np.full((len(weights), len(pairs)), np.nan) for key in ("variance", "mean", "composite")}
    for column, ((a, b), d) in enumerate(zip(pairs, directions)):
        n, mean, m2, side = _pair_units(moments, a, b)
        w = weights[:, :, [a, b]].transpose(0, 2, 1).reshape(len(weights), -1)
        proj_mean = (mean @ d)[:, None]
        proj_m2 = np.einsum("i,uij,j->u", d, m2, d)[:, None, None]
        # per class along d, and the pair along d
        classes = [_pooled(n, proj_mean, proj_m2, w * (side == s)) for s in (0, 1)]
        total, _, along = _pooled(n, proj_mean, proj_m2, w)
        trace = _pair_trace(n, mean, np.trace(m2, axis1=1, axis2=2) + moments.dropped[:, [a, b]].T.reshape(-1), w)
        (n_a, mu_a, m_a), (n_b, mu_b, m_b) = classes
        with np.errstate(divide="ignore", invalid="ignore"):
            spread = np.sqrt(np.maximum(m_a[:, 0, 0] + m_b[:, 0, 0], 0.0) / total)
            mean_alignment = (mu_a[:, 0] - mu_b[:, 0]) / spread
            variance = np.maximum(along[:, 0, 0], 0.0) / (trace if normalize else total)
        out["variance"][:, column] = variance
        out["mean"][:, column] = mean_alignment
        out["composite"][:, column] = variance * mean_alignment
    return out


def _pair_trace(n: np.ndarray, mean: np.ndarray, traces: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """tr of the weighted union's centred second moment (B,), from unit traces and the Gram of unit means."""
    reference = n @ mean / max(n.sum(), 1.0)
    centred = mean - reference
    wn = weights * n
    total = wn.sum(axis=1)
    gram = centred @ centred.T
    with np.errstate(divide="ignore", invalid="ignore"):
        between = np.einsum("bu,uv,bv->b", wn, gram, wn) / total
    return weights @ traces + wn @ np.diag(gram) - between


def _top_eigenvectors(m2: np.ndarray, k: int) -> np.ndarray:
    """Top-``k`` eigenvectors (k', d) of a centred second moment, dropping null directions (k' <= k)."""
    k = min(k, len(m2))
    values, vectors = eigh(m2, subset_by_index=[len(m2) - k, len(m2) - 1])
    values, vectors = values[::-1], vectors[:, ::-1]
    keep = values > max(RANK_TOLERANCE * values[0], 0.0)
    return vectors[:, keep].T


def singular_alignment(moments: Moments, directions: np.ndarray, pairs: list[tuple[int, int]],
                       weights: np.ndarray, subspace: int = 16) -> np.ndarray:
    """Singular alignment (B, P): max over the top-2 eigenvectors v of the pair's centred covariance of |cos(v, d)|.
    Row 0 (all weights one) is exact; resamples are solved in the pair's top-``subspace`` eigenvectors."""
    out = np.full((len(weights), len(pairs)), np.nan)
    for column, ((a, b), d) in enumerate(zip(pairs, directions)):
        n, mean, m2, _ = _pair_units(moments, a, b)
        w = weights[:, :, [a, b]].transpose(0, 2, 1).reshape(len(weights), -1)
        _, _, pair_m2 = _pooled(n, mean, m2, np.ones((1, len(n))))
        basis = _top_eigenvectors(pair_m2[0], max(subspace, 2))
        if len(basis) == 0:
            continue
        _, _, projected = _pooled(n, mean @ basis.T, np.einsum("ki,uij,lj->ukl", basis, m2, basis, optimize=True), w)
        _, vectors = np.linalg.eigh(projected)
        top = vectors[:, :, -min(2, len(basis)):]
        out[:, column] = np.abs(np.einsum("bkr,k->br", top, basis @ d)).max(axis=1)
    return out


def effective_dimension(moments: Moments, weights: np.ndarray) -> np.ndarray:
    """Participation ratio tr(M)² / tr(M²) of the centred second moment M of all examples, per weight row (B,).

    With c_u the unit means about their pooled mean, R_u = M_u + n_u c_u c_uᵀ, N = Σ w_u n_u and μ = Σ w_u n_u c_u / N,
    a resample's M = S - N μμᵀ with S = Σ w_u R_u, so tr M = Σ w_u tr R_u - N|μ|² and
    tr M² = wᵀKw - 2N Σ_u w_u μᵀR_uμ + N²|μ|⁴ (K_uv = <R_u, R_v>, formed once: units² x d²). μ lies in the span
    of the unit means (orthonormal basis Q, rank r <= units), so μᵀR_uμ needs only QᵀM_uQ (r x r per unit).
    A residual trace ρ left out of the moments (:attr:`Moments.residual`) adds ρ to tr M and ρ² / D to tr M², as
    if spread evenly over the D = :attr:`Moments.outside` directions the moments do not span.
    """
    n = moments.count.reshape(-1)
    dim = moments.mean.shape[-1]
    mean = moments.mean.reshape(-1, dim)
    m2 = moments.m2.reshape(-1, dim, dim)
    w = weights.reshape(len(weights), -1)
    centred = mean - n @ mean / max(n.sum(), 1.0)
    raw = m2 + n[:, None, None] * centred[:, :, None] * centred[:, None, :]
    flat = raw.reshape(len(n), -1)
    K = flat @ flat.T
    _, singular, vt = np.linalg.svd(centred, full_matrices=False)
    Q = vt[singular > max(RANK_TOLERANCE * singular[:1].max(initial=0.0), 0.0)]
    coords = centred @ Q.T  # (U, r)
    inner = np.einsum("ki,uij,lj->ukl", Q, m2, Q, optimize=True)  # QᵀM_uQ
    total = w @ n
    with np.errstate(divide="ignore", invalid="ignore"):
        z = (w * n) @ coords / total[:, None]  # μ in the basis
        mu_sq = np.einsum("bk,bk->b", z, z)
        along = z @ coords.T  # (B, U): c_uᵀμ
        quad = np.einsum("bk,ukl,bl->bu", z, inner, z, optimize=True) + n * along**2  # μᵀR_uμ
        trace = w @ np.trace(raw, axis1=1, axis2=2) - total * mu_sq
        square = (np.einsum("bu,uv,bv->b", w, K, w) - 2 * total * np.einsum("bu,bu->b", w, quad)
                  + total**2 * mu_sq**2)
        _, _, pooled = _pooled(n, mean, m2, np.ones((1, len(n))))  # the plain value without cancellation
        trace[0], square[0] = np.trace(pooled[0]), np.sum(pooled[0] * pooled[0])
        residual = w @ moments.dropped.reshape(-1)
        trace = trace + residual
        if moments.outside:
            square = square + residual**2 / moments.outside
        return trace**2 / square


def layer_samples(moments: Moments, hits: np.ndarray | None, label_rows: np.ndarray | None, wanted: set[str],
                  weights: np.ndarray, normalize: bool, subspace: int) -> dict[str, np.ndarray]:
    """Each requested statistics measure at one layer: the value (weights row 0) followed by the resamples.

    ``hits`` (G, m) are the units' lens hits (output alignment); ``label_rows`` (m, d) define the pair directions.
    Alignments are per pair of the classes present, averaged over pairs.
    """
    out: dict[str, np.ndarray] = {}
    if "output_alignment" in wanted:
        flat = weights.reshape(len(weights), -1)
        out["output_alignment"] = flat @ hits.reshape(-1) / (flat @ moments.count.reshape(-1))
    present = np.flatnonzero(moments.count.sum(axis=0) > 0)
    pairs = label_pairs(present)
    directed = {"variance_alignment": "variance", "mean_alignment": "mean", "composite_alignment": "composite"}
    if wanted & set(directed):
        directions = pair_directions(label_rows, pairs)
        values = directed_alignment(moments, directions, pairs, weights, normalize)
        out.update({name: values[key].mean(axis=1) for name, key in directed.items() if name in wanted})
    if "singular_alignment" in wanted:
        directions = pair_directions(label_rows, pairs)
        out["singular_alignment"] = singular_alignment(moments, directions, pairs, weights, subspace).mean(axis=1)
    if "effective_dimension" in wanted:
        out["effective_dimension"] = effective_dimension(moments, weights)
    return out


# --- the store form (a group written by ``extract(..., keep="statistics")``) --------------------------------------

#: Arrays of a statistics group: name -> dims (``resample_block``: the bootstrap's blocks of queries, not a decoder
#: ``block``; ``dim_t``: the second ``dim`` index of a d x d moment).
STORED = {
    "stat_count": ("layer", "resample_block", "class"),
    "stat_mean": ("layer", "resample_block", "class", "dim"),
    "stat_m2": ("layer", "resample_block", "class", "dim", "dim_t"),
    "stat_shift": ("layer", "dim"),
}


def stored_layout(n_layers: int, n_blocks: int, n_classes: int, dim: int) -> dict[str, tuple]:
    """(dims, shape, dtype) of each statistics array, as :class:`extraction.store.GroupWriter.create` takes them."""
    sizes = {"layer": n_layers, "resample_block": n_blocks, "class": n_classes, "dim": dim, "dim_t": dim}
    return {name: (dims, tuple(sizes[d] for d in dims), "float64") for name, dims in STORED.items()}


def stored_values(moments: Moments, shift: np.ndarray) -> dict[str, np.ndarray]:
    """The statistics arrays' values (layer-leading moments and the per-layer shift)."""
    return {"stat_count": moments.count, "stat_mean": moments.mean, "stat_m2": moments.m2, "stat_shift": shift}


def stored_moments(ds: Any, layer: int) -> Moments:
    """One layer's unit moments read from a statistics group (an xarray Dataset)."""
    one = ds[["stat_count", "stat_mean", "stat_m2"]].sel(layer=layer)
    return Moments(one["stat_count"].values, one["stat_mean"].values, one["stat_m2"].values)
