"""The layer sweep over a tiny-model store: shape, CIs, attrs, parallel modes, the tidy table and the lens."""

import numpy as np
import pytest
import xarray as xr

from extraction.errors import StoreError
from extraction.store import open_group
from geometry import MEASURES, MeasureError, composite_alignment, measure, separability, table
from geometry.lens import lens_logits

BRACKETED = ["output_alignment", "singular_alignment", "variance_alignment", "mean_alignment",
             "composite_alignment", "denoising_gain"]


@pytest.fixture(scope="module")
def icl_result(tiny_store):
    return measure(tiny_store, "icl", n_boot=200, seed=1, progress=False)


def test_dims_values_and_attrs(icl_result, tiny_store):
    ds = open_group(tiny_store, "icl")
    assert icl_result["value"].dims == ("layer", "measure")
    assert list(icl_result["measure"].values) == list(MEASURES)
    assert list(icl_result["layer"].values) == list(range(ds.sizes["layer"]))
    attrs = icl_result.attrs
    assert attrs["group"] == "icl" and attrs["n_boot"] == 200 and attrs["seed"] == 1 and attrs["rank"] == 10
    assert attrs["n_boot_separability"] == 50 and attrs["cv"] == "none" and attrs["unembedding"] == "unembed"
    assert attrs["accuracy"] == pytest.approx(float(ds["correct"].mean()))
    assert 0 <= attrs["label_accuracy"] <= 1 and attrs["task"] == "sentiment"
    # values are the pure functions' values on each layer
    layer = 3
    H, y = ds["hidden"].sel(layer=layer).values, ds["label"].values
    value = icl_result["value"].sel(layer=layer)
    assert value.sel(measure="composite_alignment") == pytest.approx(composite_alignment(H, y, ds["unembed"].values))
    assert value.sel(measure="separability") == separability(H, y, seed=1)
    # layer 0 is the embedding of the same last token for every query: directional measures are undefined
    assert np.isnan(icl_result["value"].sel(layer=0, measure="composite_alignment"))


def test_confidence_intervals_bracket_the_values(icl_result):
    inner = icl_result.sel(layer=icl_result["layer"][1:], measure=BRACKETED)
    assert (inner["ci_low"] <= inner["value"] + 1e-12).all() and (inner["value"] <= inner["ci_high"] + 1e-12).all()
    # separability's interval comes from other splits, effective dimension's lies below the value for n << d
    # (resamples repeat queries, which lowers the rank); both are still proper intervals
    rest = icl_result.sel(layer=icl_result["layer"][1:], measure=["separability", "effective_dimension"])
    assert (rest["ci_low"] <= rest["ci_high"]).all()


def test_no_bootstrap_gives_nan_intervals_and_same_values(tiny_store, icl_result):
    quick = measure(tiny_store, "icl", n_boot=0, seed=1, progress=False, layers=[2, 4])
    assert quick["ci_low"].isnull().all() and quick["ci_high"].isnull().all()
    xr.testing.assert_allclose(quick["value"], icl_result["value"].sel(layer=[2, 4]))


def test_parallel_modes_agree(tiny_store, monkeypatch):
    kwargs = dict(measures=["composite_alignment", "effective_dimension"], n_boot=50, progress=False)
    serial = measure(tiny_store, "topic", parallel="serial", **kwargs)
    threads = measure(tiny_store, "topic", parallel="threads", **kwargs)
    xr.testing.assert_equal(serial[["value", "ci_low", "ci_high"]], threads[["value", "ci_low", "ci_high"]])
    # the test extra installs Dask: auto picks it, and the same tasks run as dask.delayed
    dask = measure(tiny_store, "topic", parallel=None, **kwargs)
    assert dask.attrs["parallel"] == "dask"
    xr.testing.assert_equal(serial["value"], dask["value"])
    # without Dask, auto falls back to threads and asking for it says what to install
    monkeypatch.setattr("geometry.sweep._dask_available", lambda: False)
    assert measure(tiny_store, "topic", parallel=None, **kwargs).attrs["parallel"] == "threads"
    with pytest.raises(MeasureError, match=r"parallel='dask' needs Dask: pip install 'icl-geometry\[dask\]'"):
        measure(tiny_store, "topic", parallel="dask", **kwargs)


def test_in_memory_dataset_and_multiclass(tiny_store):
    ds = open_group(tiny_store, "topic").load()
    result = measure(ds, measures=["mean_alignment", "output_alignment"], n_boot=20, progress=False)
    assert result.attrs["group"] == "topic" and result.attrs["classes"] == list(ds["class"].values)
    assert result.attrs["pairwise_measures"] == ["mean_alignment"]


def test_table_is_tidy_over_all_groups_and_writes_csv(tiny_store, tmp_path):
    out = tmp_path / "t" / "m.csv"
    frame = table(tiny_store, out=out, n_boot=10, n_boot_separability=5, progress=False,
                  measures=["separability", "composite_alignment"])
    assert list(frame.columns) == ["group", "layer", "measure", "value", "ci_low", "ci_high", "normalize_variance"]
    assert set(frame["group"]) == {"icl", "zero_shot", "topic"}
    accuracy = frame[frame["measure"] == "accuracy"]
    assert len(accuracy) == 3 and accuracy["layer"].isna().all()
    assert out.read_text().startswith("group,layer,measure,value,ci_low,ci_high,normalize_variance")
    assert frame["normalize_variance"].all()


def test_sweep_errors(tiny_store):
    with pytest.raises(MeasureError, match="unknown measure 'accuracy'; choose from separability"):
        measure(tiny_store, measures=["accuracy"], progress=False)
    with pytest.raises(MeasureError, match=r"layers \[99\] are not in the data"):
        measure(tiny_store, layers=[99], progress=False)
    with pytest.raises(MeasureError, match="parallel must be one of dask, threads, serial"):
        measure(tiny_store, parallel="processes", progress=False)
    with pytest.raises(StoreError, match="has no group 'nope'"):
        measure(tiny_store, "nope", progress=False)
    ds = open_group(tiny_store, "icl").drop_vars("lens_top_token")
    with pytest.raises(MeasureError, match="the group lacks lens_top_token"):
        measure(ds, progress=False)


def test_array_lens_reproduces_the_stored_logit_lens(tiny_store):
    ds = open_group(tiny_store, "icl")
    for layer in ds["layer"].values:
        got = lens_logits(ds["hidden"].sel(layer=layer).values, ds["lens_unembed"].values, ds["lens_bias"].values,
                          center=bool(ds.attrs["lens_center"]))
        np.testing.assert_allclose(got, ds["lens_label_logits"].sel(layer=layer).values, rtol=1e-4, atol=1e-4)
