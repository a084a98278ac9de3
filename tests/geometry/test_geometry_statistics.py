"""Measures from sufficient statistics (engine="statistics"): equal to the in-memory sweep, on Dask and streaming."""

import numpy as np
import pytest
import xarray as xr

from geometry import MeasureError, measure
from geometry import statistics as st
from geometry.measures import separability
from tests.geometry.synthetic_states import FROM_STATISTICS, synthetic_states


def test_chan_merge_of_chunks_equals_one_pass():
    ds = synthetic_states()
    H, y = ds["hidden"].values, ds["label"].values
    blocks = st.assign_blocks(y, 4)
    acc = st.Accumulator(blocks, 4, 3)
    for start in range(0, len(y), 37):
        index = np.arange(start, min(start + 37, len(y)))
        acc.add(index, H[index], y[index])
    whole = st.chunk_moments(H, y, blocks, acc.shift, 4, 3)
    for got, want in zip((acc.moments.count, acc.moments.mean, acc.moments.m2), (whole.count, whole.mean, whole.m2)):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-9)


@pytest.mark.parametrize("group", ["icl", "topic"])
@pytest.mark.parametrize("normalize", [True, False])
def test_statistics_engine_equals_in_memory_on_a_store(tiny_store, group, normalize):
    kwargs = dict(measures=["separability", *FROM_STATISTICS], n_boot=0, progress=False,
                  normalize_variance=normalize)
    states = measure(tiny_store, group, **kwargs)
    stats = measure(tiny_store, group, engine="statistics", **kwargs)
    # layer 0 (every query's last token is the same) is NaN in both
    xr.testing.assert_allclose(states["value"], stats["value"], rtol=1e-6, atol=1e-9)
    assert stats.attrs["engine"] == "statistics" and states.attrs["engine"] == "states"


def test_bootstrap_of_one_example_blocks_is_the_in_memory_bootstrap():
    """Blocks of one query make the block bootstrap the stratified example bootstrap; with the same seed the two
    draw the same resamples, so the intervals agree to rounding."""
    ds = synthetic_states()
    kwargs = dict(measures=FROM_STATISTICS, n_boot=400, progress=False)
    states = measure(ds, **kwargs)
    stats = measure(ds, engine="statistics", n_blocks=ds.sizes["example"], **kwargs)
    for name in ("value", "ci_low", "ci_high"):
        xr.testing.assert_allclose(states[name], stats[name], rtol=1e-6, atol=1e-9)


def test_bootstrap_of_coarse_blocks_agrees_within_monte_carlo_error():
    """Blocks of ~6 queries (16 per class): the interval widths estimate the example bootstrap's with about 16
    degrees of freedom per class, so their ratio has a relative s.d. near 1/sqrt(2 * 15) = 18%; checked within
    a factor of 1.8 either way for every measure and layer (about 3 s.d.)."""
    ds = synthetic_states()
    kwargs = dict(measures=FROM_STATISTICS, n_boot=1000, progress=False)
    states = measure(ds, **kwargs)
    stats = measure(ds, engine="statistics", n_blocks=16, **kwargs)
    ratio = (stats["ci_high"] - stats["ci_low"]) / (states["ci_high"] - states["ci_low"])
    assert ((ratio > 1 / 1.8) & (ratio < 1.8)).all(), ratio.values


def test_separability_is_measured_on_a_seeded_subsample():
    ds = synthetic_states(n=120)
    result = measure(ds, measures=["separability"], n_boot=0, progress=False, engine="statistics",
                     separability_subsample=60)
    from geometry.statistics_sweep import subsample_indices

    y = ds["label"].values
    chosen = subsample_indices(y, 60, 0)
    assert len(chosen) == 60 and np.bincount(y[chosen]).min() >= 15
    for layer in (0, 1):
        assert result["value"].sel(layer=layer, measure="separability") == separability(
            ds["hidden"].values[chosen, layer], y[chosen])
    assert result.attrs["separability_subsample"] == 60


def test_denoising_gain_is_refused_by_name_and_skipped_by_default(tiny_store):
    with pytest.raises(MeasureError, match="denoising_gain needs every state"):
        measure(tiny_store, measures=["denoising_gain"], engine="statistics", progress=False)
    result = measure(tiny_store, engine="statistics", n_boot=0, n_boot_separability=0, progress=False)
    assert result.attrs["skipped_measures"] == ["denoising_gain"]
    assert result["value"].sel(measure="denoising_gain").isnull().all()
    with pytest.raises(MeasureError, match="engine must be one of states, statistics"):
        measure(tiny_store, engine="dask", progress=False)


# --- a real dask.distributed cluster -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def client():
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  memory_limit="1GiB") as cluster, distributed.Client(cluster) as connected:
        yield connected


def test_reduction_on_a_local_cluster_equals_in_memory(tiny_store, client, tmp_path):
    ds = synthetic_states(n=700, layers=2, dim=8)
    path = tmp_path / "big.zarr"
    ds.chunk({"example": 100, "layer": 1}).to_zarr(path, group="g", zarr_format=3, consolidated=False)
    lazy = xr.open_zarr(path, group="g", consolidated=False)
    assert lazy["hidden"].data.npartitions == 14  # 7 chunks along example x 2 layers
    kwargs = dict(measures=FROM_STATISTICS, n_boot=50, progress=False)
    from distributed import get_task_stream

    with get_task_stream(client) as tasks:
        on_cluster = measure(lazy, engine="statistics", **kwargs)
    assert on_cluster.attrs["parallel"] == "dask"
    assert {task["worker"] for task in tasks.data} == set(client.scheduler_info()["workers"])  # both workers ran
    xr.testing.assert_allclose(measure(ds, **kwargs)["value"], on_cluster["value"], rtol=1e-6, atol=1e-9)
    store = measure(tiny_store, "topic", engine="statistics", **kwargs)
    xr.testing.assert_allclose(measure(tiny_store, "topic", **kwargs)["value"], store["value"], rtol=1e-6, atol=1e-9)


# --- extract(..., keep="statistics") -------------------------------------------------------------------------------

def test_extracted_statistics_equal_the_stored_states_path(tiny_gemma, tiny_store, tmp_path):
    from extraction.extractor import extract

    path = tmp_path / "stats.zarr"
    group = extract(tiny_gemma, path, task="topic", shots=2, n=24, setting="topic", keep="statistics",
                    statistics_blocks=4, progress=False)
    assert "hidden" not in group and group["stat_m2"].dims == ("layer", "resample_block", "class", "dim", "dim_t")
    assert group.attrs["keep"] == "statistics" and bool(group["done"].all())
    kwargs = dict(measures=FROM_STATISTICS, n_boot=100, n_blocks=4, progress=False, engine="statistics")
    from_stats = measure(path, "topic", **kwargs)
    from_states = measure(tiny_store, "topic", **kwargs)
    assert from_stats.attrs["statistics_source"] == "stored statistics"
    for name in ("value", "ci_low", "ci_high"):
        xr.testing.assert_allclose(from_states[name], from_stats[name], rtol=1e-6, atol=1e-9)
    # and the values are the in-memory sweep's
    in_memory = measure(tiny_store, "topic", measures=FROM_STATISTICS, n_boot=0, progress=False)
    xr.testing.assert_allclose(in_memory["value"], from_stats["value"], rtol=1e-6, atol=1e-9)
    # separability needs states: skipped by default, refused by name
    default = measure(path, "topic", engine="statistics", n_boot=0, progress=False)
    assert set(default.attrs["skipped_measures"]) == {"separability", "denoising_gain"}
    with pytest.raises(MeasureError, match="separability needs stored states"):
        measure(path, "topic", measures=["separability"], engine="statistics", progress=False)


def test_keep_is_checked(tiny_gemma, tmp_path):
    from extraction.errors import StoreError
    from extraction.extractor import extract

    with pytest.raises(StoreError, match="keep must be one of states, statistics"):
        extract(tiny_gemma, tmp_path / "s.zarr", n=4, keep="moments", progress=False)


def test_an_interrupted_statistics_run_marks_nothing_done_and_reruns_whole(tiny_gemma, tmp_path, monkeypatch):
    from extraction.errors import StoreError
    from extraction.extractor import extract
    from extraction.store import open_group as open_store_group

    kwargs = dict(task="sentiment", shots=2, n=16, batch_size=4, keep="statistics", statistics_blocks=2,
                  progress=False)
    clean = extract(tiny_gemma, tmp_path / "clean.zarr", **kwargs)
    calls = []
    original = st.Accumulator.add

    def failing(self, *args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        original(self, *args)

    monkeypatch.setattr(st.Accumulator, "add", failing)
    with pytest.raises(KeyboardInterrupt):
        extract(tiny_gemma, tmp_path / "cut.zarr", **kwargs)
    with pytest.raises(StoreError, match="incomplete \\(16 examples not written\\)"):
        open_store_group(tmp_path / "cut.zarr", "icl")
    monkeypatch.setattr(st.Accumulator, "add", original)
    resumed = extract(tiny_gemma, tmp_path / "cut.zarr", **kwargs)
    for name in ("stat_count", "stat_mean", "stat_m2"):
        np.testing.assert_allclose(resumed[name].values, clean[name].values, rtol=1e-12, atol=1e-12)


def test_a_store_larger_than_the_workers_memory_finishes_and_equals_the_in_memory_subset(tmp_path):
    """A store of 640 copies of a subset of 4,096 queries (2 layers x 16 dims, float32: 320 MiB in 40 chunks of
    65,536) measured on 2 workers limited to 256 MiB each (a worker with its libraries loaded holds ~130 MiB). The
    copies have the subset's means, covariances and hit rates, so every measure's value equals the in-memory value
    on the subset (to 1e-6)."""
    import zarr
    from dask.utils import parse_bytes

    distributed = pytest.importorskip("distributed")
    limit = parse_bytes("256MiB")
    subset = synthetic_states(n=4096, layers=2, dim=16, classes=2, seed=3)
    subset["hidden"] = subset["hidden"].astype(np.float32)
    in_memory = measure(subset, measures=FROM_STATISTICS, n_boot=0, progress=False, parallel="serial")
    per_chunk, chunks = 16, 40
    n = chunks * per_chunk * subset.sizes["example"]
    group = zarr.open_group(str(tmp_path / "big.zarr"), mode="w").create_group("g")
    for name in ("hidden", "label", "lens_top_token"):
        chunk = np.concatenate([subset[name].values] * per_chunk)
        out = group.create_array(name, shape=(n, *chunk.shape[1:]), chunks=chunk.shape, dtype=chunk.dtype,
                                 dimension_names=subset[name].dims)
        for k in range(chunks):
            out[k * len(chunk):(k + 1) * len(chunk)] = chunk
    for name in ("unembed", "label_token", "layer", "class"):
        values = subset[name].values
        group.create_array(name, shape=values.shape, dtype=values.dtype,
                           dimension_names=subset[name].dims)[...] = values
    assert group["hidden"].nbytes > limit
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                       memory_limit=limit)
    with cluster, distributed.Client(cluster):
        big = measure(xr.open_zarr(tmp_path / "big.zarr", group="g", consolidated=False), measures=FROM_STATISTICS,
                      n_boot=20, progress=False, engine="statistics")
    assert big.attrs["n_examples"] == n and big.attrs["parallel"] == "dask"
    xr.testing.assert_allclose(in_memory["value"], big["value"], rtol=1e-6)


def test_subsampled_separability_is_close_to_the_full_probe_and_its_interval_is_wider():
    """n = 2,000 queries, subsample 500. Each value is a held-out accuracy: on 250 test queries its s.e. is at
    most 0.032, on 1,000 at most 0.016, so the two differ by about 0.035 s.d. (plus a small bias of the smaller
    training half): checked within 0.1 (~3 s.d.) at every layer. The subsample's interval is the spread of a probe
    fit on 500 queries, so it is wider than the full probe's (conservative), checked on average over layers."""
    ds = synthetic_states(n=2000, layers=3, dim=10, classes=2, seed=5)
    kwargs = dict(measures=["separability"], n_boot=60, n_boot_separability=60, progress=False)
    full = measure(ds, **kwargs).sel(measure="separability")
    sub = measure(ds, engine="statistics", separability_subsample=500, **kwargs).sel(measure="separability")
    assert (abs(sub["value"] - full["value"]) < 0.1).all(), (sub["value"].values, full["value"].values)
    assert float((sub["ci_high"] - sub["ci_low"]).mean()) > float((full["ci_high"] - full["ci_low"]).mean())
