"""Stratified bootstrap of queries and percentile confidence intervals.

Resampling is done within each gold class (class counts stay fixed), so no resample loses a class and every
pairwise measure stays defined. A resample is represented by counts: how often each query was drawn.
"""

from __future__ import annotations

import numpy as np

#: Coverage of the percentile intervals.
CI_LEVEL = 0.95


def resample_counts(y: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(n_boot, n) float counts of a stratified bootstrap: each row draws every class's queries with replacement."""
    counts = np.zeros((n_boot, len(y)))
    for c in np.unique(y):
        rows = np.flatnonzero(y == c)
        counts[:, rows] = rng.multinomial(len(rows), np.full(len(rows), 1.0 / len(rows)), size=n_boot)
    return counts


def resample_indices(y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Indices of one stratified bootstrap resample of ``y``'s positions (sorted)."""
    counts = resample_counts(y, 1, rng)[0].astype(np.int64)
    return np.repeat(np.arange(len(y)), counts)


def percentile_interval(samples: np.ndarray, level: float = CI_LEVEL) -> tuple[float, float]:
    """Percentile interval of one measure's resampled values; non-finite resamples are dropped (NaN if none left)."""
    finite = np.asarray(samples, dtype=float)
    finite = finite[np.isfinite(finite)]
    if len(finite) == 0:
        return np.nan, np.nan
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(finite, [tail, 100 - tail])
    return float(low), float(high)
