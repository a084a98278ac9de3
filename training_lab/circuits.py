"""The three attention metrics of [M] (Minegishi et al., ICML 2025) that name the circuits of in-context meta-learning.

A context of N (item, label) pairs and a query is a sequence of 2N + 1 tokens. [M] numbers positions from 1: item
k sits at 2k - 1, its label at 2k, the query at 2N + 1, and p_ij is the attention weight from position i (the row,
the query side) to position j (the key). The metrics, for one attention block's post-softmax pattern:

- **bigram** = p_{2N+1, 2N+1}: how much the query attends to itself (the read-out then maps the query's own item
  to a label, as a bigram model would, ignoring the context);
- **label attention** = sum_k p_{2N+1, 2k}: the query's total attention on the context's label tokens;
- **chunk example** = (1/N) sum_k p_{2k, 2k-1}: how much each label token attends to the item just before it, on
  average over the N pairs (it binds each label to its item: an (item, label) "chunk").

In code positions are 0-based, so item k (k = 1..N) is at 2k - 2, its label at 2k - 1, the query at 2N: the
labels are the odd positions 1, 3, .., 2N - 1 and the items the even positions 0, 2, .., 2N - 2.

Inputs are post-softmax patterns (every row sums to 1; causal, though causality is not required) as an xarray
``DataArray`` with dims ``query`` and ``key`` among others (the run store's order is (step, seed, block, head,
example, query, key); its per-step ``mean_pattern`` lacks ``example``), or a numpy array (or anything
``numpy.asarray`` takes, torch tensors included) whose axes are the last ones of that order: a 2-D array is
(query, key), a 3-D one (example, query, key), a 7-D one the full order. The metrics are averaged over ``example``
unless ``per_example=True``; as they are linear in the pattern, the metrics of the example-mean pattern equal the
mean of the examples' metrics. Other dims (``head`` included) are kept.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import xarray as xr

from geometry.errors import MeasureError
from geometry.validation import to_numpy

#: The run store's dims of attention patterns, in order.
PATTERN_DIMS = ("step", "seed", "block", "head", "example", "query", "key")
#: The metrics, in output order.
METRICS = ("bigram", "label_attention", "chunk_example")
#: How far a row's sum may stray from 1 before the patterns are refused as not post-softmax.
ROW_SUM_TOLERANCE = 1e-3


def as_patterns(patterns: Any, dims: Sequence[str] | None = None) -> xr.DataArray:
    """Attention patterns as a float DataArray with ``query`` and ``key`` dims, checked to be post-softmax.

    A numpy array gets ``dims`` when given, else the last ``ndim`` names of :data:`PATTERN_DIMS`.
    """
    if isinstance(patterns, xr.DataArray):
        array = patterns
    else:
        values = to_numpy(patterns)
        names = tuple(dims) if dims is not None else PATTERN_DIMS[max(0, len(PATTERN_DIMS) - values.ndim):]
        if values.ndim > len(PATTERN_DIMS) or len(names) != values.ndim:
            raise MeasureError(f"attention patterns of shape {values.shape} need {values.ndim} dim names; pass dims= "
                               f"or use the store's order {PATTERN_DIMS} (trailing axes)")
        array = xr.DataArray(values, dims=names)
    missing = [d for d in ("query", "key") if d not in array.dims]
    if missing:
        raise MeasureError(f"attention patterns lack the dims {missing}; they have {array.dims}")
    if array.dtype.kind not in "biuf":
        raise MeasureError(f"attention patterns must hold numbers; got dtype {array.dtype}")
    array = array.astype(np.float64)
    n_query, n_key = array.sizes["query"], array.sizes["key"]
    if n_query != n_key or n_query < 3 or n_query % 2 == 0:
        raise MeasureError(f"attention patterns must be square over 2N + 1 positions (N pairs and a query); got "
                           f"{n_query} queries x {n_key} keys")
    values = array.values
    if not np.isfinite(values).all() or (values < 0).any():
        raise MeasureError("attention patterns contain NaN, infinite or negative weights; pass post-softmax patterns")
    worst = float(np.abs(values.sum(axis=array.dims.index("key")) - 1).max())
    if worst > ROW_SUM_TOLERANCE:
        raise MeasureError(f"attention rows must sum to 1 (post-softmax patterns); a row sums {worst:.3g} away from 1")
    return array


def n_pairs(patterns: xr.DataArray) -> int:
    """N, the number of (item, label) pairs of a 2N + 1 position pattern."""
    return (patterns.sizes["query"] - 1) // 2


def circuit_metrics(patterns: Any, *, per_example: bool = False, dims: Sequence[str] | None = None) -> xr.Dataset:
    """[M]'s bigram, label-attention and chunk-example metrics (see the module doc) of every pattern.

    Returns a Dataset with one variable per metric over the patterns' dims other than ``query`` and ``key`` (and
    ``example``, averaged over, unless ``per_example``); coordinates are kept. ``dims`` names a numpy array's axes.
    """
    p = as_patterns(patterns, dims)
    n = n_pairs(p)
    query = 2 * n
    labels = np.arange(1, 2 * n, 2)  # 0-based positions 2k - 1 of the labels, k = 1..N
    items = labels - 1  # 0-based positions 2k - 2 of the items
    query_row = p.isel(query=query)
    metrics = xr.Dataset({
        "bigram": query_row.isel(key=query),
        "label_attention": query_row.isel(key=labels).sum("key"),
        # Row 2k - 1 (label k) to column 2k - 2 (item k): the pairs' entries, taken pointwise, then averaged.
        "chunk_example": p.isel(query=xr.DataArray(labels, dims="pair"),
                                key=xr.DataArray(items, dims="pair")).mean("pair"),
    })
    metrics = metrics.drop_vars([c for c in ("query", "key") if c in metrics.coords])
    if not per_example and "example" in metrics.dims:
        metrics = metrics.mean("example")
    metrics.attrs.update(n_pairs=n, positions="0-based: item k at 2k-2, label k at 2k-1, query at 2N",
                         averaged_over_examples=bool(not per_example and "example" in p.dims))
    return metrics


def single_head(array: xr.DataArray | xr.Dataset) -> xr.DataArray | xr.Dataset:
    """Drop a ``head`` dim of size 1 ([M]'s model has one head per layer); several heads must be chosen first."""
    if "head" not in array.dims:
        return array
    if array.sizes["head"] != 1:
        raise MeasureError(f"the circuits are defined for one head per block; these have {array.sizes['head']} "
                           "heads: pick one with .sel(head=h)")
    return array.isel(head=0, drop=True)


def heads_mean(patterns: xr.DataArray) -> xr.DataArray:
    """The heads' mean pattern of each block (a ``head`` dim of size 1 is just dropped).

    [M]'s metrics are defined for one head per block; they are linear in the pattern, so the metrics of the mean
    pattern are the means of the heads' metrics: the lab's summary for models with several heads per block ([S]'s).
    """
    if "head" not in patterns.dims:
        return patterns
    return patterns.mean("head", keep_attrs=True) if patterns.sizes["head"] > 1 else patterns.isel(head=0, drop=True)


def query_shares(metrics: xr.Dataset) -> xr.Dataset:
    """The query's attention split three ways: on itself (bigram), on the labels, on the items (the rest)."""
    return xr.Dataset({"self": metrics["bigram"], "labels": metrics["label_attention"],
                       "items": 1 - metrics["bigram"] - metrics["label_attention"]})
