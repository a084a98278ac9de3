"""Low-rank statistics (geometry.sketch, extract(keep="statistics", statistics_rank=r)): exact while nothing is
dropped, close to the full moments on a decaying spectrum otherwise."""

from functools import partial

import numpy as np
import pytest
import xarray as xr

from geometry import measure
from geometry import statistics as st
from geometry.sketch import SketchAccumulator
from tests.geometry.synthetic_states import FROM_STATISTICS, synthetic_states

#: Two classes of 400 queries in 24 dimensions, separated by 1.5 (a decay makes the spectrum fall off).
_states = partial(synthetic_states, n=400, dim=24, classes=2, separation=1.5)


def _statistics_group(ds: xr.Dataset, accumulator: st.Accumulator, chunk: int = 37) -> xr.Dataset:
    """The group ``extract(keep="statistics")`` would write for states ``ds``: the accumulator fed in chunks."""
    H, y = ds["hidden"].values, ds["label"].values
    for start in range(0, len(y), chunk):
        index = np.arange(start, min(start + chunk, len(y)))
        accumulator.add(index, H[index], y[index])
    sizes = {"layer": ds.sizes["layer"], "dim": ds.sizes["dim"]}
    layout = accumulator.layout(sizes["layer"], sizes["dim"])
    arrays = {name: (layout[name][0], value) for name, value in accumulator.values().items()}
    return ds.drop_vars("hidden").assign(arrays)


def _accumulator(ds, n_blocks, rank=None):
    y = ds["label"].values
    blocks = st.assign_blocks(y, n_blocks)
    classes = ds.sizes["class"]
    if rank is None:
        return st.Accumulator(blocks, n_blocks, classes)
    return SketchAccumulator(blocks, n_blocks, classes, rank, anchors=ds["unembed"].values)


def test_a_sketch_keeps_count_mean_and_trace_exactly_and_the_full_moment_at_full_rank():
    ds = _states(dim=12)
    full = _accumulator(ds, 4)
    _statistics_group(ds, full)
    for rank, exact in ((12, True), (3, False)):
        sketch = _accumulator(ds, 4, rank)
        _statistics_group(ds, sketch)
        got, want = sketch.moments, full.moments
        np.testing.assert_allclose(got.count, want.count)
        np.testing.assert_allclose(got.mean, want.mean, rtol=1e-10, atol=1e-10)
        kept = np.einsum("lgcri,lgcrj->lgcij", got.factor, got.factor)
        np.testing.assert_allclose(np.trace(kept, axis1=-2, axis2=-1) + got.residual,
                                   np.trace(want.m2, axis1=-2, axis2=-1), rtol=1e-10)
        if exact:
            np.testing.assert_allclose(kept, want.m2, rtol=1e-9, atol=1e-8)
            assert np.abs(got.residual).max() < 1e-8
        else:
            assert (got.residual > 0).all()


@pytest.mark.parametrize("normalize", [True, False])
def test_a_sketch_that_drops_nothing_gives_the_full_statistics_values_and_intervals(normalize):
    """Blocks of ~25 queries with rank 30 > dim: nothing is dropped, so values and intervals equal the full
    moments' (and the values the in-memory sweep's) to 1e-6."""
    ds = _states(dim=20, classes=3)
    kwargs = dict(measures=FROM_STATISTICS, n_boot=200, progress=False, engine="statistics",
                  normalize_variance=normalize)
    full = measure(_statistics_group(ds, _accumulator(ds, 6)), **kwargs)
    low = measure(_statistics_group(ds, _accumulator(ds, 6, rank=30)), **kwargs)
    for name in ("value", "ci_low", "ci_high"):
        xr.testing.assert_allclose(full[name], low[name], rtol=1e-6, atol=1e-9)
    in_memory = measure(ds, measures=FROM_STATISTICS, n_boot=0, progress=False, normalize_variance=normalize)
    xr.testing.assert_allclose(in_memory["value"], low["value"], rtol=1e-6, atol=1e-9)


def test_a_low_rank_sketch_is_exact_along_the_label_rows_and_close_elsewhere():
    """d = 64, spread decaying as 1 / (1 + axis), rank 8 per unit of ~50 queries: the sketch drops ~5% of the
    trace. Output alignment and, since the second moment is kept exactly on and across the label rows' span, the
    variance, mean and composite alignments stay exact (1e-6). Singular alignment and effective dimension depend on
    the top of the spectrum, which the sketch keeps: checked to 1%."""
    ds = _states(n=800, dim=64, decay=1.0)
    kwargs = dict(measures=FROM_STATISTICS, n_boot=0, progress=False, engine="statistics")
    full = measure(_statistics_group(ds, _accumulator(ds, 8)), **kwargs)["value"]
    sketch = _accumulator(ds, 8, rank=8)
    low = measure(_statistics_group(ds, sketch), **kwargs)["value"]
    kept = np.einsum("lgcri,lgcri->l", sketch.moments.factor, sketch.moments.factor)
    residual = sketch.moments.residual.sum(axis=(1, 2))
    assert ((residual / (kept + residual)) > 0.02).all()  # the sketch does drop something
    for names, rtol in ((["output_alignment", "variance_alignment", "mean_alignment", "composite_alignment"], 1e-6),
                        (["singular_alignment", "effective_dimension"], 0.01)):
        xr.testing.assert_allclose(full.sel(measure=names), low.sel(measure=names), rtol=rtol)


def test_extracted_low_rank_statistics_equal_the_stored_states_path(tiny_gemma, tiny_store, tmp_path):
    """Blocks of at most 2 queries per class with rank 4: exact, so equal to the states path to 1e-6."""
    from extraction.extractor import extract

    path = tmp_path / "sketch.zarr"
    group = extract(tiny_gemma, path, task="topic", shots=2, n=24, setting="topic", keep="statistics",
                    statistics_blocks=4, statistics_rank=4, progress=False)
    assert "hidden" not in group and "stat_m2" not in group
    assert group["stat_factor"].dims == ("layer", "resample_block", "class", "rank", "dim")
    assert group.sizes["anchor"] == 2 * group.sizes["class"]  # the unembed and lens_unembed rows' span
    assert group.attrs["statistics_rank"] == 4 and bool(group["done"].all())
    kwargs = dict(measures=FROM_STATISTICS, n_boot=100, n_blocks=4, progress=False, engine="statistics")
    from_sketch = measure(path, "topic", **kwargs)
    from_states = measure(tiny_store, "topic", **kwargs)
    for name in ("value", "ci_low", "ci_high"):
        xr.testing.assert_allclose(from_states[name], from_sketch[name], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("rank", [0, 2.5, True])
def test_statistics_rank_is_checked(tiny_gemma, tmp_path, rank):
    from extraction.errors import StoreError
    from extraction.extractor import extract

    with pytest.raises(StoreError, match="statistics_rank must be an integer >= 1"):
        extract(tiny_gemma, tmp_path / "s.zarr", n=4, keep="statistics", statistics_rank=rank, progress=False)


def test_an_interrupted_low_rank_run_reruns_to_the_same_sketch(tiny_gemma, tmp_path, monkeypatch):
    """The rerun finds the group created and takes its anchors from the stored label rows."""
    from extraction.extractor import extract

    kwargs = dict(task="sentiment", shots=2, n=16, batch_size=4, keep="statistics", statistics_blocks=2,
                  statistics_rank=3, progress=False)
    clean = extract(tiny_gemma, tmp_path / "clean.zarr", **kwargs)
    original = SketchAccumulator.fold

    def failing(self, *args):
        raise KeyboardInterrupt

    monkeypatch.setattr(SketchAccumulator, "fold", failing)
    with pytest.raises(KeyboardInterrupt):
        extract(tiny_gemma, tmp_path / "cut.zarr", **kwargs)
    monkeypatch.setattr(SketchAccumulator, "fold", original)
    resumed = extract(tiny_gemma, tmp_path / "cut.zarr", **kwargs)
    for name in ("stat_count", "stat_mean", "stat_factor", "stat_residual", "stat_cross", "stat_anchor"):
        np.testing.assert_allclose(resumed[name].values, clean[name].values, rtol=1e-10, atol=1e-10)
