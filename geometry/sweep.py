"""The layer sweep: every measure at every layer of a store group, with stratified bootstrap confidence intervals.

One layer is read at a time (``hidden.isel(layer=l)``; the store chunks whole layers), so a store larger than
memory works. Layers are computed in parallel: with Dask importable, as ``dask.delayed`` tasks (any scheduler or
cluster the user configured); otherwise on a thread pool. Each worker runs BLAS single-threaded to avoid
oversubscription.

Bootstrap (95% percentile intervals). The same ``n_boot`` stratified resamples of the queries (drawn once from
``seed``) are used at every layer. The cheap measures are bootstrapped in full and at once: the alignment and
effective-dimension kernels take all resamples as a weight matrix (see :mod:`geometry.kernels`); singular
alignment of a resample is solved in the span of the pair's top ``singular_subspace`` principal directions (exact
when that reaches the pair's rank). Output alignment and denoising gain resample per-query correctness (the
rank-r subspace is fitted once on all queries). Separability refits a probe per resample, so it uses only
``min(n_boot, n_boot_separability)`` resamples (default 50), each a fresh split with separately resampled
training and held-out parts.

The denoising gain needs the store's array form of the final norm. A group whose attr ``lens_form_exact`` is False
has none (see :mod:`geometry.lens`): asked for by name, the measure is refused with a :class:`MeasureError`; in the
default set it is skipped with a logged warning, its values are NaN and the result's attr ``skipped_measures``
names it (``skip_reasons`` says why).

``engine="statistics"`` computes the measures from per-chunk sufficient statistics instead and never holds a layer
(see :mod:`geometry.statistics_sweep`); everything above describes ``engine="states"``, the default for every
group that holds states (``engine=None`` picks ``statistics`` for groups extracted with ``keep="statistics"``).

Caveat: a resample repeats some queries, which lowers the rank of the resampled states, so when n is not much
larger than d the effective dimension's interval lies below its value (the percentile bootstrap is biased for
this statistic); read it as a spread, not as coverage.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import xarray as xr
from tqdm.auto import tqdm

from extraction.store import reading
from geometry import kernels
from geometry.bootstrap import percentile_interval, resample_counts
from geometry.errors import MeasureError
from geometry.lens import StoreLens, lens_refusal, store_lens
from geometry.measures import (denoising_hits, lens_hits, prepare_alignment, probe_fitting, separability,
                               separability_bootstrap)
from geometry.names import MEASURES, PAIRWISE
from geometry.validation import check_fraction, check_int, check_labels, check_layers, check_states

log = logging.getLogger(__name__)

#: Store variables a measure reads besides ``hidden`` and ``label`` (alignment: the ``unembedding`` rows chosen).
NEEDS = {"output_alignment": ("lens_top_token", "label_token"), "denoising_gain": ("lens_unembed", "lens_bias")}
DIRECTED = {"variance_alignment": "variance", "mean_alignment": "mean", "composite_alignment": "composite"}
ALIGNMENT = {"singular_alignment", *DIRECTED}
PARALLEL = ("dask", "threads", "serial")
ENGINES = ("states", "statistics")
CI_METHOD = "95% percentile bootstrap over queries, resampled within each gold class"


@dataclass(frozen=True)
class SweepSettings:
    """The parameters of a sweep, validated; all of them are recorded in the result's attrs."""

    measures: tuple[str, ...]
    n_boot: int
    n_boot_separability: int
    seed: int
    rank: int
    test_size: float
    cv: int | None
    singular_subspace: int
    unembedding: str
    normalize_variance: bool


@dataclass(frozen=True)
class GroupArrays:
    """The small, layer-independent arrays of a group, read once."""

    labels: np.ndarray
    label_rows: np.ndarray | None  # the rows defining the alignment directions
    lens: StoreLens | None  # None: denoising_gain is not requested or is skipped (NaN)
    label_token: np.ndarray | None
    counts: np.ndarray  # (1 + n_boot, n): a row of ones, then the resamples' counts


def _settings(names: Sequence[str] | None, n_boot: int, n_boot_separability: int, seed: int, rank: int,
              test_size: float, cv: int | None, singular_subspace: int, unembedding: str,
              normalize_variance: bool) -> SweepSettings:
    chosen = tuple(names or MEASURES)
    unknown = [m for m in chosen if m not in MEASURES]
    if unknown:
        raise MeasureError(f"unknown measure {', '.join(map(repr, unknown))}; choose from {', '.join(MEASURES)}")
    if unembedding not in ("unembed", "lens_unembed"):
        raise MeasureError(f"unembedding must be 'unembed' or 'lens_unembed', not {unembedding!r}")
    if not isinstance(normalize_variance, (bool, np.bool_)):
        raise MeasureError(f"normalize_variance must be True or False, not {normalize_variance!r}")
    return SweepSettings(
        chosen, check_int(n_boot, "n_boot", 0), check_int(n_boot_separability, "n_boot_separability", 0),
        check_int(seed, "seed", 0), check_int(rank, "rank", 1), check_fraction(test_size, "test_size"),
        None if cv is None else check_int(cv, "cv", 2), check_int(singular_subspace, "singular_subspace", 2),
        unembedding, bool(normalize_variance),
    )


def _open(store: str | Path | xr.Dataset, group: str) -> tuple[xr.Dataset, str, str]:
    """The group's dataset, its name and where it came from."""
    if isinstance(store, xr.Dataset):
        return store, str(store.attrs.get("setting", group)), "in-memory dataset"
    from extraction.store import open_group

    return open_group(store, group), group, str(store)


def _lens(ds: xr.Dataset, settings: SweepSettings, explicit: bool, where: str) -> StoreLens | None:
    """The group's lens for the denoising gain; None when it is not requested, or skipped (see the module doc)."""
    if "denoising_gain" not in settings.measures:
        return None
    reason = lens_refusal(ds.attrs, where)
    if reason and not explicit:
        log.warning("%s; denoising_gain is skipped (NaN)", reason)
        return None
    return store_lens(ds, where)


def _group_arrays(ds: xr.Dataset, settings: SweepSettings, explicit: bool, where: str) -> GroupArrays:
    needed = {"hidden", "label"} | {v for m in settings.measures for v in NEEDS.get(m, ())}
    if ALIGNMENT & set(settings.measures):
        needed.add(settings.unembedding)
    missing = sorted(needed - set(ds.variables))
    if missing:
        raise MeasureError(f"the group lacks {', '.join(missing)}, needed by the requested measures; "
                           "re-extract it or choose other measures")
    labels = check_labels(ds["label"].values, ds.sizes["example"])
    ones = kernels.unit_weights(len(labels))
    resamples = resample_counts(labels, settings.n_boot, np.random.default_rng(settings.seed))
    lens = _lens(ds, settings, explicit, where)
    return GroupArrays(labels, ds[settings.unembedding].values if settings.unembedding in ds else None, lens,
                       ds["label_token"].values if "label_token" in ds else None, np.vstack([ones, resamples]))


def separability_samples(H: np.ndarray, labels: np.ndarray, settings: SweepSettings) -> np.ndarray:
    """Separability of one layer's states followed by its probe-refit bootstrap resamples."""
    value = separability(H, labels, seed=settings.seed, test_size=settings.test_size, cv=settings.cv)
    n_boot = min(settings.n_boot, settings.n_boot_separability)
    boot = separability_bootstrap(H, labels, n_boot, seed=settings.seed, test_size=settings.test_size)
    return np.concatenate([[value], boot])


def layer_samples(H: np.ndarray, top_token: np.ndarray | None, arrays: GroupArrays,
                  settings: SweepSettings) -> dict[str, np.ndarray]:
    """Each requested measure at one layer: the value followed by its bootstrap resamples."""
    wanted = set(settings.measures)
    weights = arrays.counts
    out: dict[str, np.ndarray] = {}
    if "separability" in wanted:
        out["separability"] = separability_samples(H, arrays.labels, settings)
    if "output_alignment" in wanted:
        hits = lens_hits(top_token, arrays.labels, arrays.label_token)
        out["output_alignment"] = weights @ hits / len(hits)
    if wanted & ALIGNMENT:
        inputs = prepare_alignment(H, arrays.labels, arrays.label_rows)
        args = (inputs.X, inputs.y, inputs.directions, inputs.pairs, weights)
        if wanted & set(DIRECTED):
            directed = kernels.alignment_batch(*args, settings.normalize_variance)
            out.update({name: directed[key].mean(axis=1) for name, key in DIRECTED.items() if name in wanted})
        if "singular_alignment" in wanted:
            out["singular_alignment"] = kernels.singular_alignment_batch(*args, settings.singular_subspace).mean(axis=1)
    if "effective_dimension" in wanted:
        states = check_states(H)
        out["effective_dimension"] = kernels.effective_dimension_batch(kernels.shift(states), weights)
    if "denoising_gain" in wanted and arrays.lens is None:
        out["denoising_gain"] = np.full(len(weights), np.nan)
    elif "denoising_gain" in wanted:
        lens = arrays.lens
        raw, denoised = denoising_hits(H, arrays.labels, lens.unembed, lens.bias, rank=settings.rank,
                                       center=lens.center, scale=lens.scale, softcap=lens.softcap)
        out["denoising_gain"] = weights @ (denoised.astype(float) - raw) / len(raw)
    return out


def summarise(samples: dict[str, np.ndarray], names: Sequence[str]) -> np.ndarray:
    """(3, measures): value, CI low, CI high."""
    table = np.full((3, len(names)), np.nan)
    for j, name in enumerate(names):
        table[0, j] = samples[name][0]
        table[1:, j] = percentile_interval(samples[name][1:])
    return table


def _dask_available() -> bool:
    try:
        import dask  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_parallel(parallel: str | None) -> str:
    """The parallel mode: None picks ``dask`` when importable, else ``threads``."""
    if parallel is None:
        return "dask" if _dask_available() else "threads"
    if parallel not in PARALLEL:
        raise MeasureError(f"parallel must be one of {', '.join(PARALLEL)} or None, not {parallel!r}")
    if parallel == "dask" and not _dask_available():
        raise MeasureError("parallel='dask' needs Dask: pip install 'icl-geometry[dask]' (or use 'threads')")
    return parallel


def map_layers(fn: Callable[[int], Any], layers: Sequence[int], parallel: str, bar: tqdm) -> list[Any]:
    """``fn`` over ``layers`` in order, serially, on a thread pool or as Dask tasks, advancing ``bar``."""
    if parallel == "serial" or len(layers) == 1:
        results = []
        for layer in layers:
            results.append(fn(layer))
            bar.update()
        return results
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        if parallel == "dask":
            import dask

            results = list(dask.compute(*[dask.delayed(fn)(layer) for layer in layers]))
            bar.update(len(layers))
            return results
        results = [None] * len(layers)
        with ThreadPoolExecutor(max_workers=min(os.cpu_count() or 1, len(layers))) as pool:
            futures = {pool.submit(fn, layer): i for i, layer in enumerate(layers)}
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                bar.update()
        return results


def group_accuracy(ds: xr.Dataset) -> dict[str, float]:
    """Whole-vocabulary accuracy (from ``correct``) and label-restricted accuracy (argmax of ``label_logits``)."""
    return {
        "accuracy": float(ds["correct"].mean()) if "correct" in ds else np.nan,
        "label_accuracy": float((ds["label_logits"].argmax("class") == ds["label"]).mean())
        if "label_logits" in ds else np.nan,
    }


def measure(store: str | Path | xr.Dataset, group: str = "icl", measures: Sequence[str] | None = None, *,
            n_boot: int = 1000, seed: int = 0, rank: int = 10, layers: Sequence[int] | None = None,
            progress: bool = True, parallel: str | None = None, n_boot_separability: int = 50,
            test_size: float = 0.5, cv: int | None = None, singular_subspace: int = 16,
            unembedding: str = "unembed", normalize_variance: bool = True, engine: str | None = None,
            n_blocks: int | None = None, separability_subsample: int = 4096) -> xr.Dataset:
    """Every measure at every layer of one group: a Dataset with ``value``, ``ci_low``, ``ci_high`` (layer, measure).

    ``store`` is a store path (the group is opened lazily) or an already opened group Dataset (``group`` is then
    only a label, taken from its ``setting`` attr when present). ``measures`` defaults to :data:`MEASURES`;
    ``n_boot`` resamples give 95% percentile CIs (0: NaN CIs), of which separability uses at most
    ``n_boot_separability`` (one probe fit each); ``rank`` is the denoising rank; ``layers`` a subset of layers;
    ``parallel`` is ``dask``, ``threads``, ``serial`` or None (auto). ``test_size``/``cv`` are separability's;
    ``singular_subspace`` sizes the subspace of the singular-alignment resamples (see the module docstring);
    ``unembedding`` picks the rows that define the alignment directions (``unembed``: the raw LM-head rows E_y,
    as in [Y]; ``lens_unembed``: scaled by the final norm's gain). ``normalize_variance`` (default True) makes
    variance alignment, and the composite built on it, a proportion of variance; False gives [Y]'s appendix form
    dᵀ(H̄ᵀH̄/n)d (see :func:`geometry.variance_alignment`). The attrs record every parameter, the group, its
    accuracy (whole vocabulary, from ``correct``), label-restricted accuracy and any skipped measure (see the
    module docstring on the denoising gain).

    ``engine="statistics"`` never loads a whole layer: the measures come from per-chunk sufficient statistics
    (Dask reductions when the store opens with Dask; ``n_blocks`` blocks per class are the bootstrap's units),
    separability from a probe on a seeded stratified subsample of ``separability_subsample`` queries, and a group
    written with ``extract(..., keep="statistics")`` is read directly; see :mod:`geometry.statistics_sweep`.
    ``parallel`` does not apply to it (the Dask scheduler in use does the work). ``engine=None`` (the default)
    picks ``statistics`` for such a group (it has no states) and ``states`` otherwise.
    """
    settings = _settings(measures, n_boot, n_boot_separability, seed, rank, test_size, cv, singular_subspace,
                         unembedding, normalize_variance)
    if engine is not None and engine not in ENGINES:
        raise MeasureError(f"engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    ds, name, source = _open(store, group)
    if engine is None:
        engine = "statistics" if "hidden" not in ds and "stat_count" in ds else "states"
    chosen = check_layers(ds["layer"].values, layers)
    if engine == "statistics":
        from geometry.statistics_sweep import measure_layers

        run = measure_layers(ds, settings, chosen, name=name, source=source, explicit=measures is not None,
                             n_blocks=n_blocks, subsample=separability_subsample, progress=progress)
    else:
        run = _measure_states(ds, settings, chosen, name=name, source=source, explicit=measures is not None,
                              parallel=parallel, progress=progress)
    record = {key: "none" if value is None else value for key, value in asdict(settings).items()}
    attrs = {
        "group": name, "store": source, **record, "measures": list(settings.measures), "layers": chosen,
        "parallel": run.mode, "engine": engine, "ci": run.ci, "n_examples": run.n_examples, **run.attrs,
        "classes": [str(c) for c in ds["class"].values] if "class" in ds.coords else [],
        "pairwise_measures": [m for m in PAIRWISE if m in settings.measures],
        "lens_center": bool(ds.attrs.get("lens_center", False)), **group_accuracy(ds),
        "skipped_measures": list(run.skipped), "skip_reasons": list(run.skipped.values()),
        **{key: ds.attrs[key] for key in ("task", "shots") if key in ds.attrs},
    }
    dims = ("layer", "measure")
    tables = run.tables
    return xr.Dataset({"value": (dims, tables[:, 0]), "ci_low": (dims, tables[:, 1]), "ci_high": (dims, tables[:, 2])},
                      coords={"layer": chosen, "measure": list(settings.measures)}, attrs=attrs)


@dataclass(frozen=True)
class LayerRun:
    """What an engine returns: (layers, 3, measures) tables and what the result's attrs record about the run."""

    tables: np.ndarray
    n_examples: int
    mode: str
    ci: str
    skipped: dict[str, str]  # measure -> why it is NaN
    attrs: dict[str, Any]


def _measure_states(ds: xr.Dataset, settings: SweepSettings, chosen: list[int], *, name: str, source: str,
                    explicit: bool, parallel: str | None, progress: bool) -> LayerRun:
    """The default engine: each layer's states read into memory, the measures computed by the pure kernels."""
    where = f"group {name!r} of {source}"
    with reading(source):
        arrays = _group_arrays(ds, settings, explicit=explicit, where=where)
    mode = resolve_parallel(parallel)
    log.info("measuring %s (%d layers, %d examples, %d resamples, %s)", name, len(chosen), len(arrays.labels),
             settings.n_boot, mode)

    def one_layer(layer: int) -> np.ndarray:
        with reading(source):
            H = ds["hidden"].sel(layer=layer).values
            top = ds["lens_top_token"].sel(layer=layer).values if "output_alignment" in settings.measures else None
        return summarise(layer_samples(H, top, arrays, settings), settings.measures)

    with probe_fitting(), tqdm(total=len(chosen), desc=f"measure {name}", unit="layer", disable=not progress) as bar:
        tables = np.stack(map_layers(one_layer, chosen, mode, bar))
    skipped = {}
    if "denoising_gain" in settings.measures and arrays.lens is None:
        skipped["denoising_gain"] = lens_refusal(ds.attrs, f"group {name!r}")
    return LayerRun(tables, len(arrays.labels), mode, CI_METHOD, skipped, {})


def measured_groups(store: str | Path) -> list[str]:
    """The groups of a store that hold hidden states (the ones a sweep can measure)."""
    from extraction.store import list_groups, open_root

    names = list_groups(store)
    with reading(store):
        root = open_root(store)
        return [name for name in names if "hidden" in root[name]]


def statistics_groups(store: str | Path) -> list[str]:
    """The groups of a store written with ``extract(..., keep="statistics")`` (statistics, no states)."""
    from extraction.store import list_groups, open_root

    names = list_groups(store)
    with reading(store):
        root = open_root(store)
        return [name for name in names if "stat_count" in root[name] and "hidden" not in root[name]]


def measure_groups(store: str | Path, groups: Sequence[str] | None = None,
                   **measure_kwargs: Any) -> dict[str, xr.Dataset]:
    """:func:`measure` of several groups (default: every group with hidden states or statistics), keyed by group."""
    names = list(groups) if groups else sorted(measured_groups(store) + statistics_groups(store))
    if not names:
        raise MeasureError(f"store {store} has no group with hidden states or statistics; run icl-geometry extract "
                           "first")
    return {name: measure(store, name, **measure_kwargs) for name in names}


def tidy(results: Sequence[xr.Dataset]) -> pd.DataFrame:
    """Sweep results as one long table: group, layer, measure, value, ci_low, ci_high, normalize_variance.

    The group-level ``accuracy`` and ``label_accuracy`` follow each group's layer rows with an empty layer;
    ``normalize_variance`` repeats the group's setting (False: variance and composite alignment are in the
    appendix's unnormalised form).
    """
    frames = []
    for result in results:
        frame = result[["value", "ci_low", "ci_high"]].to_dataframe().reset_index()
        accuracy = pd.DataFrame({"layer": pd.NA, "measure": ["accuracy", "label_accuracy"],
                                 "value": [result.attrs["accuracy"], result.attrs["label_accuracy"]],
                                 "ci_low": np.nan, "ci_high": np.nan})
        frame = pd.concat([frame.astype({"layer": "Int64"}), accuracy.astype({"layer": "Int64"})], ignore_index=True)
        frame.insert(0, "group", result.attrs["group"])
        frame["normalize_variance"] = bool(result.attrs.get("normalize_variance", True))
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)[["group", "layer", "measure", "value", "ci_low", "ci_high",
                                                 "normalize_variance"]]


def table(store: str | Path, groups: Sequence[str] | None = None, *, out: str | Path | None = None,
          **measure_kwargs: Any) -> pd.DataFrame:
    """The tidy table (see :func:`tidy`) of several groups' sweeps; written as CSV to ``out`` when given."""
    frame = tidy(list(measure_groups(store, groups, **measure_kwargs).values()))
    if out is not None:
        write_csv(frame, out)
    return frame


def write_csv(frame: pd.DataFrame, out: str | Path) -> Path:
    """Write a table as CSV, creating the folder; returns the path."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False)
    return path
