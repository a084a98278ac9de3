"""The layer sweep from sufficient statistics (``geometry.measure(..., engine="statistics")``): no whole layer in memory.

Per layer, the (block, class) moments of :mod:`geometry.statistics` are reduced from the stored chunks (a Dask
graph when the store opens with Dask: any scheduler or ``dask.distributed`` cluster in use), or read directly from
a group that ``extract(..., keep="statistics")`` wrote (full moments, or the rank-r sketches of
:mod:`geometry.sketch`, approximate where that module says). Alignment, effective dimension and output alignment
come from full moments exactly (equal to the in-memory sweep); their intervals come from the stratified block
bootstrap of :mod:`geometry.statistics` (the same resamples at every layer).

Separability needs a probe fit on states, so it is measured on a seeded, stratified subsample of
``separability_subsample`` queries (all of them when there are no more): only those rows are read. Its interval is
the in-memory probe bootstrap on that subsample, so it is the spread of a probe fit on s queries (wider than that of
a probe fit on all n: conservative). With n <= s the value and interval equal the in-memory ones.

The denoising gain needs every state's reconstruction and is not computed here (NaN; refused when asked for by
name). A statistics group keeps no states, so its separability is skipped likewise.
"""

from __future__ import annotations

import logging

import numpy as np
import xarray as xr
from tqdm.auto import tqdm

from extraction.store import reading
from geometry import sketch, statistics
from geometry.errors import MeasureError
from geometry.measures import probe_fitting
from geometry.sweep import NEEDS, LayerRun, SweepSettings, separability_samples, summarise
from geometry.validation import check_int, check_labels, check_unembedding

log = logging.getLogger(__name__)

CI_METHOD = ("95% percentile stratified block bootstrap over the per-block statistics (blocks of queries resampled "
             "within each gold class); separability: probe bootstrap on the subsample")
NOT_FROM_STATISTICS = {
    "denoising_gain": "denoising_gain needs every state's low-rank reconstruction; it is not computed from "
                      "statistics (use engine='states' on a store with states)",
    "separability": "separability needs stored states for its probe; this group keeps only statistics",
}


def _skipped(ds: xr.Dataset, settings: SweepSettings, explicit: bool) -> dict[str, str]:
    """The requested measures this engine cannot compute for the group: refused when named, else skipped (NaN)."""
    cannot = {"denoising_gain"} | ({"separability"} if "hidden" not in ds else set())
    skipped = {name: NOT_FROM_STATISTICS[name] for name in settings.measures if name in cannot}
    if skipped and explicit:
        raise MeasureError(next(iter(skipped.values())))
    for reason in skipped.values():
        log.warning("%s; skipped (NaN)", reason)
    return skipped


def _check_group(ds: xr.Dataset, settings: SweepSettings, stored: bool) -> None:
    needed = {"label"} | ({"stat_count"} if stored else {"hidden"})
    needed |= {v for m in settings.measures for v in NEEDS.get(m, ()) if m != "denoising_gain"}
    if {"singular_alignment", "variance_alignment", "mean_alignment", "composite_alignment"} & set(settings.measures):
        needed.add(settings.unembedding)
    missing = sorted(needed - set(ds.variables))
    if missing:
        raise MeasureError(f"the group lacks {', '.join(missing)}, needed by the requested measures; "
                           "re-extract it or choose other measures")


def subsample_indices(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Sorted positions of a seeded, stratified subsample of ``size`` queries (all of them when n <= size)."""
    if len(labels) <= size:
        return np.arange(len(labels))
    from sklearn.model_selection import train_test_split

    chosen, _ = train_test_split(np.arange(len(labels)), train_size=size, stratify=labels, random_state=seed)
    return np.sort(chosen)


def measure_layers(ds: xr.Dataset, settings: SweepSettings, chosen: list[int], *, name: str, source: str,
                   explicit: bool, n_blocks: int | None, subsample: int, progress: bool) -> LayerRun:
    """Every requested measure at each chosen layer from sufficient statistics (see the module docstring)."""
    stored = "stat_count" in ds
    subsample = check_int(subsample, "separability_subsample", 4)
    with reading(source):
        _check_group(ds, settings, stored)
        skipped = _skipped(ds, settings, explicit)
        labels = check_labels(ds["label"].values, ds.sizes["example"])
        n_classes = ds.sizes["class"] if "class" in ds.dims else int(labels.max()) + 1
        if stored:
            n_blocks = ds.sizes["resample_block"]
        n_blocks = check_int(statistics.N_BLOCKS if n_blocks is None else n_blocks, "n_blocks", 1)
        blocks = statistics.assign_blocks(labels, n_blocks)
        rows = None
        if settings.unembedding in ds:
            rows = check_unembedding(ds[settings.unembedding].values, np.unique(labels), ds.sizes["dim"])
        label_token = ds["label_token"].values if "label_token" in ds else None
    count = statistics.unit_hits(np.ones(len(labels)), labels, blocks, n_blocks, n_classes)
    weights = statistics.block_weights(count, settings.n_boot, np.random.default_rng(settings.seed))
    wanted = set(settings.measures) - set(skipped)
    sample = subsample_indices(labels, subsample, settings.seed) if "separability" in wanted else None
    dask_backed = not stored and statistics.is_dask(ds["hidden"].data)
    log.info("measuring %s from statistics (%d layers, %d examples, %d blocks per class, %d resamples)", name,
             len(chosen), len(labels), n_blocks, settings.n_boot)

    def one_layer(layer: int) -> np.ndarray:
        with reading(source):
            layer_rows = rows
            if "stat_factor" in ds:
                moments, layer_rows = sketch.read_layer(ds, layer, rows)
            elif stored:
                moments = statistics.stored_moments(ds, layer)
            else:
                hidden = ds["hidden"].sel(layer=[layer])
                moments, _ = statistics.reduce_hidden(hidden, labels, blocks, n_blocks, n_classes)
                moments = statistics.Moments(moments.count[0], moments.mean[0], moments.m2[0])
            hits = None
            if "output_alignment" in wanted:
                top = ds["lens_top_token"].sel(layer=layer).values
                hits = statistics.unit_hits(top == label_token[labels], labels, blocks, n_blocks, n_classes)
            samples = statistics.layer_samples(moments, hits, layer_rows, wanted, weights, settings.normalize_variance,
                                               settings.singular_subspace)
            if sample is not None:
                H = ds["hidden"].isel(example=sample).sel(layer=layer).values
                samples["separability"] = separability_samples(H, labels[sample], settings)
        samples.update({m: np.full(len(weights), np.nan) for m in skipped})
        return summarise(samples, settings.measures)

    with probe_fitting(), tqdm(chosen, desc=f"measure {name}", unit="layer", disable=not progress) as layers:
        tables = np.stack([one_layer(layer) for layer in layers])
    attrs = {"n_blocks": n_blocks, "separability_subsample": subsample,
             "statistics_source": "stored statistics" if stored else "reduced from stored states"}
    return LayerRun(tables, len(labels), "dask" if dask_backed else "serial", CI_METHOD, skipped, attrs)
