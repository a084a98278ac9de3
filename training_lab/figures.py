"""Figures of a training run: curves with the phases shaded, circuit metrics over training, attention maps at the
start of each phase, and the geometry measures over training with the phase boundaries marked.

Training steps are drawn on a log axis (symmetric-log when step 0 is present, linear below the first positive
step), as [M] draws them. Every seed gets its own colour; each seed's transitions (the spans from
:func:`training_lab.phases.detect_phases`) are shaded in that colour, so a phase is the unshaded stretch between
two shaded ones. Figures use matplotlib's object API and are written by :func:`geometry.plots.save` (PNG and SVG by
default); every function returns the paths it wrote.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import xarray as xr
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from geometry.errors import MeasureError
from geometry.plots import FORMATS, LABELS, save
from training_lab.circuits import METRICS, as_patterns, single_head
from training_lab.phases import as_curves, phase_starts, seed_transitions

METRIC_TITLES = {"bigram": "Bigram (query on itself)", "label_attention": "Label attention (query on labels)",
                 "chunk_example": "Chunk example (labels on their items)"}
TRANSITION_ALPHA = 0.15


def _colour(i: int) -> Any:
    return colormaps["tab10"](i % 10)


def _log_steps(ax: Axes, steps: np.ndarray) -> None:
    """A log step axis; symmetric-log (linear below the first positive step) when step 0 is drawn."""
    positive = steps[steps > 0]
    if len(positive) and (steps <= 0).any():
        ax.set_xscale("symlog", linthresh=float(positive.min()))
    elif len(positive):
        ax.set_xscale("log")
    ax.set_xlabel("training step")
    ax.grid(alpha=0.3, which="major")


def _shade(ax: Axes, phases: xr.Dataset | None, seeds: Sequence[Any], colour: Any = None) -> None:
    """Each seed's transitions as spans, in the seed's colour or in ``colour`` for all."""
    if phases is None:
        return
    for i, seed in enumerate(seeds):
        if seed in phases["seed"].values:
            for span in seed_transitions(phases, seed):
                ax.axvspan(span.start, span.end, color=colour or _colour(i), alpha=TRANSITION_ALPHA, linewidth=0)


def _seed_lines(ax: Axes, curves: xr.DataArray, ylabel: str) -> None:
    for i, seed in enumerate(curves["seed"].values):
        ax.plot(curves["step"].values, curves.sel(seed=seed).values, color=_colour(i), linewidth=1.2,
                label=f"seed {seed}")
    _log_steps(ax, curves["step"].values)
    ax.set_ylabel(ylabel)


def _name_phases(ax: Axes, phases: xr.Dataset, circuits: xr.Dataset, seed: Any) -> None:
    """Write each phase's circuit just after the phase's start, upright (phases can be close on a log axis)."""
    names = circuits["circuit"].sel(seed=seed).values
    for start, name in zip(phase_starts(phases, seed), names):
        if name:
            ax.annotate(str(name).replace("_", " "), (start, 0.98), xycoords=("data", "axes fraction"),
                        xytext=(2, 0), textcoords="offset points", va="top", ha="left", fontsize=8, rotation=90,
                        bbox=dict(boxstyle="square,pad=0.1", facecolor="white", alpha=0.7, linewidth=0))


def plot_training_curves(accuracy: Any, out_dir: str | Path, *, loss: Any = None, phases: xr.Dataset | None = None,
                         circuits: xr.Dataset | None = None, steps: Any = None, name: str = "training_curves",
                         formats: Sequence[str] = FORMATS) -> list[Path]:
    """Accuracy (and loss, when given) against step with each seed's transitions shaded; ``circuits`` (from
    :func:`training_lab.phases.phase_circuits`) writes the first seed's circuit names at its phases' starts."""
    acc = as_curves(accuracy, steps)
    panels = [("accuracy", acc)] + ([("loss", as_curves(loss, steps))] if loss is not None else [])
    fig = Figure(figsize=(6.5 * len(panels), 4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    seeds = list(acc["seed"].values)
    for ax, (label, curves) in zip(axes, panels):
        _shade(ax, phases, seeds)
        _seed_lines(ax, curves, label)
        ax.set_title(f"Query {label}")
    if phases is not None and circuits is not None:
        _name_phases(axes[0], phases, circuits, seeds[0])
    if len(seeds) > 1:
        axes[-1].legend(fontsize=8)
    rule = (f"; shaded: transitions, Acc(t+{phases.attrs['window']}) - Acc(t) > {phases.attrs['threshold']}"
            if phases is not None else "")
    fig.suptitle(f"Training curves{rule}")
    return save(fig, out_dir, name, formats)


def plot_circuit_metrics(metrics: xr.Dataset, out_dir: str | Path, *, phases: xr.Dataset | None = None,
                         name: str = "circuit_metrics", formats: Sequence[str] = FORMATS) -> list[Path]:
    """[M]'s three metrics (rows) of every block (columns) against step, one line per seed, transitions shaded."""
    metrics = single_head(metrics)
    missing = [d for d in ("step", "block") if d not in metrics.dims]
    if missing:
        raise MeasureError(f"the circuit metrics lack the dims {missing}; compute them per step and block")
    if "seed" not in metrics.dims:
        metrics = metrics.expand_dims(seed=[0])
    blocks = metrics["block"].values if "block" in metrics.coords else np.arange(metrics.sizes["block"])
    fig = Figure(figsize=(4.5 * len(blocks), 2.8 * len(METRICS)), layout="constrained")
    axes = fig.subplots(len(METRICS), len(blocks), squeeze=False, sharex=True, sharey=True)
    seeds = list(metrics["seed"].values)
    for r, metric in enumerate(METRICS):
        for c in range(len(blocks)):
            ax = axes[r, c]
            _shade(ax, phases, seeds)
            _seed_lines(ax, metrics[metric].isel(block=c).transpose("step", "seed"), "attention share")
            ax.set_ylim(-0.02, 1.02)
            ax.set_title(f"block {blocks[c]} (layer {c + 1}): {METRIC_TITLES[metric]}", fontsize=9)
    for ax in axes.flat:
        ax.label_outer()
    if len(seeds) > 1:
        axes[0, -1].legend(fontsize=8)
    fig.suptitle("Circuit metrics over training (shaded: transitions)")
    return save(fig, out_dir, name, formats)


def position_names(n_pairs: int) -> list[str]:
    """Tick labels of a context's positions: x1 y1 .. xN yN q (items, labels, the query)."""
    return [f"{kind}{k}" for k in range(1, n_pairs + 1) for kind in ("x", "y")] + ["q"]


def plot_attention_maps(patterns: Any, phases: xr.Dataset, out_dir: str | Path, *, seed: Any = None,
                        circuits: xr.Dataset | None = None, name: str = "attention_maps",
                        formats: Sequence[str] = FORMATS) -> list[Path]:
    """One seed's attention pattern of every block (columns), averaged over examples, at the start of each phase
    (rows): the first stored pattern step at or after the phase's first step (else the last stored step)."""
    p = single_head(as_patterns(patterns))
    missing = [d for d in ("step", "block") if d not in p.dims]
    if missing:
        raise MeasureError(f"attention patterns for maps need the dims {missing}; they have {p.dims}")
    if "seed" not in p.dims:
        p = p.expand_dims(seed=[0])
    p = p.assign_coords({d: p[d].values if d in p.coords else np.arange(p.sizes[d]) for d in ("step", "seed")})
    seed = p["seed"].values[0] if seed is None else seed
    if seed not in p["seed"].values or seed not in phases["seed"].values:
        raise MeasureError(f"seed {seed} is not in both the patterns and the phases")
    stored = p["step"].values
    starts = phase_starts(phases, seed)
    shown = [int(stored[min(np.searchsorted(stored, start, side="left"), len(stored) - 1)]) for start in starts]
    mean = p.sel(seed=seed)
    mean = mean.mean("example") if "example" in mean.dims else mean
    labels = position_names((p.sizes["query"] - 1) // 2)
    n_blocks = p.sizes["block"]
    fig = Figure(figsize=(3.2 * n_blocks + 0.8, 3.0 * len(shown)), layout="constrained")
    axes = fig.subplots(len(shown), n_blocks, squeeze=False)
    names = circuits["circuit"].sel(seed=seed).values if circuits is not None else [""] * len(shown)
    image = None
    for r, (phase, step) in enumerate(zip(range(len(shown)), shown)):
        for c in range(n_blocks):
            ax = axes[r, c]
            image = ax.imshow(mean.sel(step=step).isel(block=c).transpose("query", "key").values, vmin=0, vmax=1,
                              cmap="viridis")
            ax.set_xticks(range(len(labels)), labels, fontsize=7)
            ax.set_yticks(range(len(labels)), labels, fontsize=7)
            circuit = f", {str(names[phase]).replace('_', ' ')}" if phase < len(names) and names[phase] else ""
            ax.set_title(f"phase {phase}{circuit}: step {step}\nblock {c} (layer {c + 1})", fontsize=9)
            ax.set_xlabel("key", fontsize=8)
            ax.set_ylabel("query", fontsize=8)
    fig.colorbar(image, ax=axes, shrink=0.6, label="attention")
    fig.suptitle(f"Attention at the start of each phase (seed {seed}, mean over examples)")
    return save(fig, out_dir, name, formats)


def plot_measures_over_training(result: xr.Dataset, out_dir: str | Path, *, phases: xr.Dataset | None = None,
                                name: str = "measures_over_training",
                                formats: Sequence[str] = FORMATS) -> list[Path]:
    """One panel per measure against step, one line per layer (from
    :func:`training_lab.geometry_over_training.geometry_over_training`), the transitions shaded. One seed: bands
    are the bootstrap CIs; several: lines are the seed mean and bands the range over seeds."""
    measures = [str(m) for m in result["measure"].values]
    seeds = list(result["seed"].values)
    cols = min(3, len(measures))
    rows = -(-len(measures) // cols)
    fig = Figure(figsize=(4.6 * cols, 3.3 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    steps = result["step"].values
    sites = result["site"].values if "site" in result.coords else [f"layer {layer}" for layer in result["layer"].values]
    for ax, measure in zip(axes, measures):
        values = result["value"].sel(measure=measure)
        if len(seeds) == 1:
            low, high = (result[k].sel(measure=measure).isel(seed=0) for k in ("ci_low", "ci_high"))
        else:
            low, high = values.min("seed"), values.max("seed")
        line = values.mean("seed")
        _shade(ax, phases, seeds, colour="grey")  # colour already tells the layers apart
        for i, layer in enumerate(result["layer"].values):
            y = line.sel(layer=layer).values
            if np.isnan(y).all():
                continue
            ax.plot(steps, y, color=_colour(i), marker="o", markersize=2.5, linewidth=1.2, label=str(sites[i]))
            ax.fill_between(steps, low.sel(layer=layer).values, high.sel(layer=layer).values, color=_colour(i),
                            alpha=0.2, linewidth=0)
        _log_steps(ax, steps)
        title, unit = LABELS.get(measure, (measure, measure))
        ax.set_title(title)
        ax.set_ylabel(unit)
    for ax in axes[len(measures):]:
        ax.set_visible(False)
    handles, labels = max((ax.get_legend_handles_labels() for ax in axes[:len(measures)]), key=lambda h: len(h[0]))
    fig.legend(handles, labels, loc="outside lower center", ncols=max(1, len(labels)), title="layer")
    band = "95% bootstrap CI" if len(seeds) == 1 else f"range over {len(seeds)} seeds (lines: mean)"
    fig.suptitle(f"Query-state geometry over training (bands: {band}; grey: transitions)")
    return save(fig, out_dir, name, formats)


def plot_runs_compared(curves: dict[str, xr.DataArray], out_dir: str | Path, *, name: str, title: str,
                       ylabel: str, threshold: float | None = None, marks: dict[str, float] | None = None,
                       formats: Sequence[str] = FORMATS) -> list[Path]:
    """One curve (step, seed) per run (configuration) on one axis: the seed mean as a line in the run's colour,
    each seed thin and faint; ``threshold`` a dashed horizontal line, ``marks`` (run -> step) dotted vertical lines
    in the runs' colours (e.g. each run's mean phase-change step)."""
    fig = Figure(figsize=(7, 4.2), layout="constrained")
    ax = fig.subplots()
    steps = np.unique(np.concatenate([c["step"].values for c in curves.values()])) if curves else np.array([0])
    for i, (run, values) in enumerate(curves.items()):
        values = as_curves(values)
        for seed in values["seed"].values:
            ax.plot(values["step"].values, values.sel(seed=seed).values, color=_colour(i), linewidth=0.6, alpha=0.3)
        ax.plot(values["step"].values, values.mean("seed").values, color=_colour(i), linewidth=1.6, label=run)
        step = (marks or {}).get(run, np.nan)
        if np.isfinite(step):
            ax.axvline(step, color=_colour(i), linestyle=":", linewidth=1.2)
    if threshold is not None:
        ax.axhline(threshold, color="black", linestyle="--", linewidth=0.8)
    _log_steps(ax, steps)
    ax.set_xlim(steps.min(), steps.max())
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if curves:
        ax.legend(fontsize=8)
    return save(fig, out_dir, name, formats)
