"""Weighted, batched forms of the geometric measures: the single implementation behind every public measure.

Each kernel takes validated float64 states ``X`` (n, d) and a weight matrix ``weights`` (B, n) and returns one
value per weight row. A row of ones is the plain measure; a row of bootstrap counts (how often each query was
drawn) is the measure of that resample, exactly as if the drawn rows were stacked. So the public functions call
these kernels with one row of ones, and the layer sweep calls them with 1,000 rows of counts at once: the work
is a few matrix products over sufficient statistics (per-class weighted sums of the states and of their
projections) instead of a Python loop over resamples.

All measures are translation invariant, so callers pass ``shift(H)`` (the states minus their first row): identical
states become exact zeros (a measure of them is NaN, "undefined"), not rounding noise.
"""

from __future__ import annotations

import numpy as np
from scipy.linalg import eigh

#: Eigenvalues of a Gram matrix below this fraction of the largest count as zero (rank deficiency).
RANK_TOLERANCE = 1e-12
#: Rows of the (n, n) Gram matrix formed at once by :func:`effective_dimension_batch` (bounds memory).
GRAM_ROWS = 2048


def shift(H: np.ndarray) -> np.ndarray:
    """States minus their first row (translation leaves every measure unchanged; see the module docstring)."""
    return H - H[:1]


def unit_weights(n: int) -> np.ndarray:
    """The (1, n) weight matrix of the plain, unresampled measure."""
    return np.ones((1, n))


def pair_directions(U: np.ndarray, pairs: list[tuple[int, int]]) -> np.ndarray:
    """Unit directions d = (U_A - U_B) / ||U_A - U_B|| of each pair, stacked (P, d)."""
    a, b = np.array(pairs).T
    diff = U[a] - U[b]
    return diff / np.linalg.norm(diff, axis=1, keepdims=True)


def top_right_singular(X: np.ndarray, k: int) -> np.ndarray:
    """The top-``k`` right singular vectors (k', d) of ``X``, largest first, dropping null directions (k' <= k).

    Eigen-decomposes the smaller Gram matrix (n x n or d x d) and keeps only the top ``k`` eigenpairs.
    """
    n, dim = X.shape
    k = min(k, n, dim)
    if k == 0:
        return np.zeros((0, dim))
    small = X @ X.T if n <= dim else X.T @ X
    values, vectors = eigh(small, subset_by_index=[len(small) - k, len(small) - 1])
    values, vectors = values[::-1], vectors[:, ::-1]
    keep = values > max(RANK_TOLERANCE * values[0], 0.0)
    values, vectors = values[keep], vectors[:, keep]
    if n <= dim:
        return (X.T @ vectors / np.sqrt(values)).T
    return vectors.T


def _class_sums(X: np.ndarray, y: np.ndarray, proj: np.ndarray, weights: np.ndarray, classes: list[int]):
    """Per-class weighted counts, sums of states, squared norms and projections, stacked over classes."""
    count, sums, norms, p1, p2 = [], [], [], [], []
    squared = np.einsum("ij,ij->i", X, X)
    for c in classes:
        rows = y == c
        w = weights[:, rows]
        count.append(w.sum(axis=1))
        sums.append(w @ X[rows])
        norms.append(w @ squared[rows])
        p1.append(w @ proj[rows])
        p2.append(w @ proj[rows] ** 2)
    return (np.stack(count, 1), np.stack(sums, 1), np.stack(norms, 1), np.stack(p1, 1), np.stack(p2, 1))


def alignment_batch(X: np.ndarray, y: np.ndarray, directions: np.ndarray, pairs: list[tuple[int, int]],
                    weights: np.ndarray, normalize: bool = True) -> dict[str, np.ndarray]:
    """Variance-, mean- and composite alignment, each (B, P): one value per weight row and label pair.

    For the pair (A, B) with direction d: variance = dᵀΣd / tr Σ over the pair's examples (Σ their weighted
    covariance), or dᵀΣd itself when not ``normalize`` ([Y]'s appendix form dᵀ(H̄ᵀH̄/n)d); mean = dᵀ(μ_A - μ_B) /
    sqrt((n_A Var_A + n_B Var_B) / (n_A + n_B)) with population variances of dᵀh, positive when class A lies
    further along d = U_A - U_B than class B; composite = variance x mean.
    """
    classes = sorted({c for pair in pairs for c in pair})
    position = {c: i for i, c in enumerate(classes)}
    a = np.array([position[p[0]] for p in pairs])
    b = np.array([position[p[1]] for p in pairs])
    columns = np.arange(len(pairs))
    count, sums, norms, p1, p2 = _class_sums(X, y, X @ directions.T, weights, classes)
    n_a, n_b = count[:, a], count[:, b]
    total = n_a + n_b
    s_a, s_b = p1[:, a, columns], p1[:, b, columns]
    q_a, q_b = p2[:, a, columns], p2[:, b, columns]
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_a, mean_b = s_a / n_a, s_b / n_b
        var_a = np.maximum(q_a / n_a - mean_a**2, 0.0)
        var_b = np.maximum(q_b / n_b - mean_b**2, 0.0)
        mean = (mean_a - mean_b) / np.sqrt((n_a * var_a + n_b * var_b) / total)
        along = q_a + q_b - (s_a + s_b) ** 2 / total
        gram = np.einsum("bcd,bed->bce", sums, sums)
        pair_sum_sq = gram[:, a, a] + gram[:, b, b] + 2 * gram[:, a, b]
        trace = norms[:, a] + norms[:, b] - pair_sum_sq / total
        variance = np.maximum(along, 0.0) / (trace if normalize else total)
    return {"variance": variance, "mean": mean, "composite": variance * mean}


def singular_alignment_batch(X: np.ndarray, y: np.ndarray, directions: np.ndarray, pairs: list[tuple[int, int]],
                             weights: np.ndarray, subspace: int) -> np.ndarray:
    """Singular alignment (B, P): max over the top-2 right singular vectors v of the pair's centred states of
    |cos(v, d)|.

    The weighted covariance of each row is eigen-decomposed inside the span of the top-``subspace`` right
    singular vectors of the pair's unweighted states (Rayleigh-Ritz). For a row of ones this is exact for any
    ``subspace`` >= 2; for resamples it is exact once ``subspace`` reaches the rank of the states and otherwise
    misses only mixing with directions beyond the top ``subspace``.
    """
    out = np.full((len(weights), len(pairs)), np.nan)
    for column, ((class_a, class_b), d) in enumerate(zip(pairs, directions)):
        rows = (y == class_a) | (y == class_b)
        centred = X[rows] - X[rows].mean(axis=0)
        basis = top_right_singular(centred, max(subspace, 2))
        if len(basis) == 0:
            continue
        k = len(basis)
        z = centred @ basis.T
        w = weights[:, rows]
        total = w.sum(axis=1)[:, None]
        mean = w @ z / total
        second = (w @ (z[:, :, None] * z[:, None, :]).reshape(len(z), k * k)).reshape(len(w), k, k)
        covariance = second / total[:, :, None] - mean[:, :, None] * mean[:, None, :]
        _, vectors = np.linalg.eigh(covariance)
        top = vectors[:, :, -min(2, k):]
        out[:, column] = np.abs(np.einsum("bkr,k->br", top, basis @ d)).max(axis=1)
    return out


def effective_dimension_batch(X: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Participation ratio (Σσ²)² / Σσ⁴ of the centred states, one value per weight row (None: one plain value).

    With weights w (total W), resample mean δ = Xᵀw / W, a_i = x_i·δ and c = ||δ||², the resample's centred
    second-moment matrix C has W·tr C = Σ w_i ||x_i||² - cW and W²·tr C² = wᵀ(G∘G)w - 2W Σ w_i a_i² + c²W²
    (G = X Xᵀ), so only (G∘G)w needs the Gram matrix, formed in row blocks of :data:`GRAM_ROWS`.
    """
    if weights is None:
        centred = X - X.mean(axis=0)
        small = centred @ centred.T if len(X) <= X.shape[1] else centred.T @ centred
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.array([np.trace(small) ** 2 / np.sum(small * small)])
    total = weights.sum(axis=1)
    delta = weights @ X / total[:, None]
    a = X @ delta.T
    c = np.einsum("bd,bd->b", delta, delta)
    squares = np.zeros(len(weights))
    for start in range(0, len(X), GRAM_ROWS):
        block = slice(start, start + GRAM_ROWS)
        gram = X[block] @ X.T
        squares += np.einsum("ib,bi->b", (gram * gram) @ weights.T, weights[:, block])
    trace = weights @ np.einsum("ij,ij->i", X, X) - c * total
    frob = squares - 2 * total * np.einsum("bi,ib->b", weights, a * a) + c**2 * total**2
    with np.errstate(divide="ignore", invalid="ignore"):
        return trace**2 / frob
