"""Input checks shared by the measures, estimators and sweep: one place that turns bad input into a clear error.

Arrays may be numpy arrays, anything ``numpy.asarray`` accepts, or torch tensors (converted without importing
torch). Floating arrays come back as float64, so sufficient statistics of large-norm hidden states do not lose
precision to cancellation.
"""

from __future__ import annotations

from itertools import combinations
from typing import Any

import numpy as np

from geometry.errors import MeasureError


def to_numpy(x: Any) -> np.ndarray:
    """A numpy copy-or-view of ``x``; torch tensors (any device or dtype) are detached and moved to the CPU."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu()
        if x.is_floating_point():
            x = x.double()
        return x.numpy()
    return np.asarray(x)


def check_states(H: Any, name: str = "H") -> np.ndarray:
    """Hidden states as a finite float64 (n, d) array."""
    array = to_numpy(H)
    if array.ndim != 2:
        raise MeasureError(f"{name} must be a 2-D array (examples, dim); got shape {array.shape}")
    if array.dtype.kind not in "biuf":
        raise MeasureError(f"{name} must hold numbers; got dtype {array.dtype}")
    array = array.astype(np.float64, copy=False)
    bad = ~np.isfinite(array)
    if bad.any():
        rows = np.flatnonzero(bad.any(axis=1))
        raise MeasureError(
            f"{name} contains {int(bad.sum())} NaN or infinite values in {len(rows)} rows (first: row {rows[0]}); "
            "drop or fix those examples before measuring"
        )
    return array


def check_labels(y: Any, n: int, *, name: str = "y", min_classes: int = 2) -> np.ndarray:
    """Class indices as an int64 (n,) array with at least ``min_classes`` distinct non-negative classes."""
    labels = to_numpy(y)
    if labels.ndim != 1:
        raise MeasureError(f"{name} must be a 1-D array of class indices; got shape {labels.shape}")
    if len(labels) != n:
        raise MeasureError(f"{name} has {len(labels)} entries but H has {n} rows; they must match one to one")
    if labels.dtype.kind not in "biu":
        raise MeasureError(f"{name} must hold integer class indices 0..m-1; got dtype {labels.dtype}")
    labels = labels.astype(np.int64, copy=False)
    if n and labels.min() < 0:
        raise MeasureError(f"{name} must hold class indices 0..m-1; got {labels.min()}")
    present = np.unique(labels)
    if len(present) < min_classes:
        found = ", ".join(str(c) for c in present) or "none"
        raise MeasureError(
            f"{name} needs at least {min_classes} classes to measure separation; got only class {found} "
            f"(n={n})"
        )
    return labels


def check_unembedding(U: Any, classes: np.ndarray, dim: int, name: str = "U") -> np.ndarray:
    """Label-word unembedding rows (m, d) as float64, with a row for every class and no two rows equal."""
    rows = check_states(U, name)
    if rows.shape[1] != dim:
        raise MeasureError(f"{name} has {rows.shape[1]} columns but H has {dim}; both must live in the model's dim")
    if classes.max() >= len(rows):
        raise MeasureError(
            f"{name} has {len(rows)} rows (one per class) but the labels go up to class {classes.max()}"
        )
    for a, b in label_pairs(classes):
        if not np.any(rows[a] != rows[b]):
            raise MeasureError(
                f"{name} rows of classes {a} and {b} coincide (do their label words share a first token?); "
                "the direction (U_A - U_B) / ||U_A - U_B|| is undefined"
            )
    return rows


def label_pairs(classes: np.ndarray) -> list[tuple[int, int]]:
    """Every pair (A, B) of the given classes with A < B: the order that fixes the sign of directed measures."""
    return [(int(a), int(b)) for a, b in combinations(np.sort(classes), 2)]


def check_int(value: Any, name: str, minimum: int) -> int:
    """An integer parameter that must be at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise MeasureError(f"{name} must be an integer >= {minimum}; got {value!r}")
    return int(value)


def check_fraction(value: Any, name: str) -> float:
    """A parameter strictly between 0 and 1."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not 0 < value < 1:
        raise MeasureError(f"{name} must be a number strictly between 0 and 1; got {value!r}")
    return float(value)


def check_layers(available: Any, layers: Any = None) -> list[int]:
    """The requested layers (default: all available ones), refusing any the data does not have."""
    have = [int(layer) for layer in available]
    if layers is None:
        return have
    chosen = [int(layer) for layer in layers]
    outside = [layer for layer in chosen if layer not in have]
    if outside:
        raise MeasureError(f"layers {outside} are not in the data; it has layers {have[0]}..{have[-1]}")
    return chosen
