"""[M]'s circuit metrics on hand-made attention patterns with known values."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from geometry.errors import MeasureError
from training_lab.circuits import circuit_metrics, query_shares, single_head

N = 4
SIZE = 2 * N + 1  # positions 0..8: items 0, 2, 4, 6; labels 1, 3, 5, 7; query 8


def causal_uniform() -> np.ndarray:
    """Every position attends uniformly to itself and all earlier positions."""
    return np.tril(np.ones((SIZE, SIZE))) / np.arange(1, SIZE + 1)[:, None]


def with_rows(rows: dict[int, dict[int, float]]) -> np.ndarray:
    """The uniform causal pattern with some rows replaced by the given {key: weight} rows."""
    p = causal_uniform()
    for row, weights in rows.items():
        p[row] = 0
        for key, weight in weights.items():
            p[row, key] = weight
    return p


def test_query_on_labels_gives_label_attention_one():
    p = with_rows({8: {1: 0.25, 3: 0.25, 5: 0.25, 7: 0.25}})
    m = circuit_metrics(p)
    assert float(m["label_attention"]) == pytest.approx(1.0)
    assert float(m["bigram"]) == 0.0


def test_query_on_itself_is_bigram():
    m = circuit_metrics(with_rows({8: {8: 1.0}}))
    assert float(m["bigram"]) == 1.0
    assert float(m["label_attention"]) == 0.0


def test_query_on_items_counts_in_neither():
    m = circuit_metrics(with_rows({8: {0: 0.5, 2: 0.5}}))
    assert float(m["bigram"]) == 0.0 and float(m["label_attention"]) == 0.0
    assert float(query_shares(m)["items"]) == pytest.approx(1.0)


def test_labels_on_their_items_is_chunk_example_one():
    p = with_rows({1: {0: 1.0}, 3: {2: 1.0}, 5: {4: 1.0}, 7: {6: 1.0}})
    assert float(circuit_metrics(p)["chunk_example"]) == pytest.approx(1.0)
    # Labels attending to the previous pair's item (or to themselves) are not chunking.
    off = with_rows({1: {1: 1.0}, 3: {0: 1.0}, 5: {2: 1.0}, 7: {4: 1.0}})
    assert float(circuit_metrics(off)["chunk_example"]) == 0.0


def test_uniform_pattern_values():
    m = circuit_metrics(causal_uniform())
    assert float(m["bigram"]) == pytest.approx(1 / 9)
    assert float(m["label_attention"]) == pytest.approx(4 / 9)
    # Label k (0-based row 2k-1) spreads over 2k positions: mean of 1/2, 1/4, 1/6, 1/8.
    assert float(m["chunk_example"]) == pytest.approx(np.mean([1 / 2, 1 / 4, 1 / 6, 1 / 8]))


def test_store_layout_is_averaged_over_examples_per_block_step_seed():
    labels = with_rows({8: {1: 0.5, 3: 0.5}})
    self_ = with_rows({8: {8: 1.0}})
    p = np.empty((2, 3, 2, 1, 2, SIZE, SIZE))  # step, seed, block, head, example, query, key
    p[...] = self_
    p[1, :, 0, 0, 0] = labels  # at step 1, block 0, example 0 attends to labels: half of the examples
    da = xr.DataArray(p, dims=("step", "seed", "block", "head", "example", "query", "key"),
                      coords={"step": [10, 20], "seed": [0, 1, 2]})
    m = single_head(circuit_metrics(da))
    assert m["label_attention"].dims == ("step", "seed", "block")
    assert list(m["step"].values) == [10, 20]
    assert float(m["label_attention"].sel(step=20, seed=1, block=0)) == pytest.approx(0.5)
    assert float(m["label_attention"].sel(step=20, block=1).max()) == 0.0
    assert float(m["bigram"].sel(step=10).min()) == 1.0
    per = circuit_metrics(p, per_example=True)  # numpy in the store's order gives the same dims
    assert per["label_attention"].dims == ("step", "seed", "block", "head", "example")
    assert float(per["label_attention"][1, 0, 0, 0, 0]) == pytest.approx(1.0)
    assert float(per["label_attention"][1, 0, 0, 0, 1]) == 0.0
    # The store's per-step mean pattern (no example dim) gives the same metrics: they are linear in p.
    mean = circuit_metrics(da.mean("example"))
    assert np.allclose(mean["label_attention"], circuit_metrics(da)["label_attention"])


def test_several_heads_must_be_chosen_first():
    p = xr.DataArray(np.tile(causal_uniform(), (2, 1, 1)), dims=("head", "query", "key"))
    with pytest.raises(MeasureError, match="one head"):
        single_head(circuit_metrics(p))
    assert "head" not in single_head(circuit_metrics(p.isel(head=[1]))).dims


@pytest.mark.parametrize("bad, message", [
    (np.ones((9, 9)), "sum to 1"),
    (np.full((8, 8), 1 / 8), "2N \\+ 1"),
    (np.full((9, 7), 1 / 7), "square"),
    (np.where(np.eye(9) > 0, np.nan, 0.0), "NaN"),
])
def test_bad_patterns_are_refused(bad, message):
    with pytest.raises(MeasureError, match=message):
        circuit_metrics(bad)
