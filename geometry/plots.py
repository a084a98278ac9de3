"""Figures of a sweep: layer-wise curves with CI bands for several groups, effective dimension, and 2-D PCA/UMAP
views of the query states coloured by class.

Figures are built with matplotlib's object API (``matplotlib.figure.Figure``, rendered by Agg), so plotting never
touches pyplot's global state or needs a display. Every function returns the paths it wrote (one per format).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import xarray as xr
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from geometry.errors import MeasureError
from geometry.transition import transition
from geometry.validation import check_layers

log = logging.getLogger(__name__)

FORMATS = ("png", "svg")
#: Panel titles and y-axis labels of the measures.
LABELS = {
    "separability": ("Separability", "probe held-out accuracy"),
    "output_alignment": ("Output alignment", "logit-lens accuracy"),
    "singular_alignment": ("Singular alignment", "max |cos(v, d)|, top-2 v"),
    "variance_alignment": ("Variance alignment", "variance share along d"),
    "mean_alignment": ("Mean alignment", "mean gap along d / pooled s.d."),
    "composite_alignment": ("Composite alignment", "variance x mean"),
    "effective_dimension": ("Effective dimension", "participation ratio"),
    "denoising_gain": ("Low-rank denoising gain", "label accuracy gain"),
}
#: Y-axis labels of the measures whose scale changes with ``normalize_variance=False`` (the appendix form).
RAW_VARIANCE_LABELS = {"variance_alignment": "variance along d (dᵀΣd)", "composite_alignment": "dᵀΣd x mean"}
MIN_PROJECTED = 3


def save(fig: Figure, out_dir: str | Path, name: str, formats: Sequence[str] = FORMATS) -> list[Path]:
    """Write ``fig`` as ``out_dir/name.<format>`` for each format; returns the paths."""
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise MeasureError(f"unknown figure format {', '.join(unknown)}; choose from {', '.join(FORMATS)}")
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        path = folder / f"{name}.{fmt}"
        fig.savefig(path, dpi=150, bbox_inches="tight")
        paths.append(path)
    return paths


def _draw_measure(ax: Axes, results: Sequence[xr.Dataset], measure: str, mark_transition: bool,
                  min_rise: float = 0.0) -> None:
    """One measure's curves for every group, with CI bands and each group's transition (:func:`transition` with
    ``min_rise``) as a dashed line."""
    for colour, result in zip(_colours(len(results)), results):
        if measure not in result["measure"].values:
            continue
        layers = result["layer"].values
        row = result.sel(measure=measure)
        group = result.attrs.get("group", "")
        ax.plot(layers, row["value"].values, marker="o", markersize=3, color=colour, label=group)
        ax.fill_between(layers, row["ci_low"].values, row["ci_high"].values, color=colour, alpha=0.2, linewidth=0)
        if mark_transition and {"separability", "composite_alignment"} <= set(result["measure"].values):
            found = transition(result, min_rise=min_rise)
            if found.layer is not None:
                ax.axvline(found.layer, color=colour, linestyle="--", linewidth=1)
    title, unit = LABELS.get(measure, (measure, measure))
    if any(not result.attrs.get("normalize_variance", True) for result in results):
        unit = RAW_VARIANCE_LABELS.get(measure, unit)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title)
    ax.set_xlabel("layer")
    ax.set_ylabel(unit)
    ax.grid(alpha=0.3)


def _colours(n: int) -> list:
    from matplotlib import colormaps

    return [colormaps["tab10"](i % 10) for i in range(n)]


def _title(results: Sequence[xr.Dataset]) -> str:
    first = results[0].attrs
    task = f"{first['task']}: " if "task" in first else ""
    groups = ", ".join(str(r.attrs.get("group", "")) for r in results)
    return f"{task}{groups} (bands: 95% bootstrap CI; dashed: transition layer)"


def plot_measures(results: Sequence[xr.Dataset], out_dir: str | Path, *, formats: Sequence[str] = FORMATS,
                  name: str = "measures", mark_transition: bool = True, min_rise: float = 0.0) -> list[Path]:
    """A grid with one panel per measure, every group's curve on shared axes; dashed lines mark transitions
    (rises of at most ``min_rise`` are not transitions, see :func:`geometry.transition`)."""
    results = list(results)
    names = list(dict.fromkeys(m for r in results for m in r["measure"].values))
    cols = min(4, len(names))
    rows = -(-len(names) // cols)
    fig = Figure(figsize=(4 * cols, 3.2 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, measure in zip(axes, names):
        _draw_measure(ax, results, measure, mark_transition, min_rise)
    for ax in axes[len(names):]:
        ax.set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=max(1, len(labels)), title="group")
    fig.suptitle(_title(results))
    return save(fig, out_dir, name, formats)


def plot_effective_dimension(results: Sequence[xr.Dataset], out_dir: str | Path, *,
                             formats: Sequence[str] = FORMATS, name: str = "effective_dimension",
                             min_rise: float = 0.0) -> list[Path]:
    """Effective dimension by layer for every group, on its own (it rises, then falls, in [Y])."""
    results = list(results)
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    _draw_measure(ax, results, "effective_dimension", mark_transition=True, min_rise=min_rise)
    ax.legend(title="group")
    fig.suptitle(_title(results))
    return save(fig, out_dir, name, formats)


def _project(H: np.ndarray, method: str, seed: int) -> np.ndarray:
    """2-D coordinates of the states by PCA or UMAP (fixed random_state; neighbours capped for tiny n)."""
    if method == "pca":
        from sklearn.decomposition import PCA

        return PCA(n_components=2, random_state=seed).fit_transform(H)
    import umap

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        small = len(H) < 2 * 15
        embedded = umap.UMAP(n_neighbors=max(2, min(15, len(H) - 1)), random_state=seed,
                             init="random" if small else "spectral").fit_transform(H)
    for warning in caught:
        log.debug("umap: %s", warning.message)
    return embedded


def plot_projections(ds: xr.Dataset, layers: Sequence[int], out_dir: str | Path, *,
                     methods: Sequence[str] = ("pca", "umap"), formats: Sequence[str] = FORMATS, seed: int = 0,
                     name: str | None = None) -> list[Path]:
    """Rows of PCA/UMAP panels (one column per layer) of a group's query states, coloured by gold class."""
    unknown = [m for m in methods if m not in ("pca", "umap")]
    if unknown:
        raise MeasureError(f"unknown projection {', '.join(unknown)}; choose pca and/or umap")
    group = str(ds.attrs.get("setting", "group"))
    labels = ds["label"].values
    classes = [str(c) for c in ds["class"].values] if "class" in ds.coords else [str(c) for c in np.unique(labels)]
    fig = Figure(figsize=(3.2 * len(layers), 3.2 * len(methods)), layout="constrained")
    axes = fig.subplots(len(methods), len(layers), squeeze=False)
    colours = _colours(len(classes))
    for col, layer in enumerate(layers):
        H = ds["hidden"].sel(layer=layer).values.astype(np.float64)
        identical = bool(np.all(H == H[:1]))
        for row, method in enumerate(methods):
            ax = axes[row, col]
            ax.set_title(f"{method.upper()}, layer {layer}")
            ax.set_xticks([])
            ax.set_yticks([])
            if len(H) < MIN_PROJECTED or identical:
                why = f"too few queries (n={len(H)})" if len(H) < MIN_PROJECTED else "all states identical"
                ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes)
                continue
            xy = _project(H, method, seed)
            for index, (word, colour) in enumerate(zip(classes, colours)):
                mask = labels == index
                ax.scatter(xy[mask, 0], xy[mask, 1], s=12, color=colour, label=word, alpha=0.8)
            ax.set_xlabel(f"{method.upper()} 1")
            ax.set_ylabel(f"{method.upper()} 2")
    handles, texts = next(((h, t) for h, t in (a.get_legend_handles_labels() for a in axes.ravel()) if h), ([], []))
    if handles:
        fig.legend(handles, texts, loc="outside lower center", ncols=len(texts), title="gold class")
    fig.suptitle(f"{group}: query states by layer")
    return save(fig, out_dir, name or f"projections_{group}", formats)


def default_layers(n_layers: int, count: int = 4) -> list[int]:
    """``count`` evenly spaced layers from the first to the last (the default projection layers)."""
    return sorted({int(round(x)) for x in np.linspace(0, n_layers - 1, min(count, n_layers))})


def plot_store(store: str | Path, groups: Sequence[str] | None = None, out_dir: str | Path = "figures", *,
               layers: Sequence[int] | None = None, formats: Sequence[str] = FORMATS, min_rise: float = 0.0,
               **measure_kwargs) -> list[Path]:
    """Measure the groups of a store and draw every figure: measures grid, effective dimension, projections at
    ``layers`` (default: :func:`default_layers`). Layers are checked before anything is computed; ``min_rise`` is
    the transitions' (:func:`geometry.transition`)."""
    from extraction.store import open_group
    from geometry.sweep import measure_groups, measured_groups

    datasets = {name: open_group(store, name) for name in (groups or measured_groups(store))}
    chosen = {name: check_layers(ds["layer"].values, layers) if layers else default_layers(ds.sizes["layer"])
              for name, ds in datasets.items()}
    results = list(measure_groups(store, list(datasets), **measure_kwargs).values())
    paths = plot_measures(results, out_dir, formats=formats, min_rise=min_rise)
    if any("effective_dimension" in r["measure"].values for r in results):
        paths += plot_effective_dimension(results, out_dir, formats=formats, min_rise=min_rise)
    for name, ds in datasets.items():
        paths += plot_projections(ds, chosen[name], out_dir, formats=formats, seed=measure_kwargs.get("seed", 0),
                                  name=f"projections_{name}")
    return paths
