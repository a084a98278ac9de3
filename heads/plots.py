"""Figures of the heads study: score heat maps (block x head) with the chosen sets marked, the accuracy bar chart
and the layer-wise measure changes. Figures are built without pyplot (no global state, no display needed) and
saved as PNG and/or SVG.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np
import pandas as pd
import xarray as xr
from matplotlib.figure import Figure

from geometry.plots import FORMATS, LABELS, save
from heads.selection import Head

if TYPE_CHECKING:
    from heads.pipeline import HeadStudy

SET_MARKERS = {"pth": ("s", "tab:blue"), "ih": ("o", "tab:red"), "random": ("x", "black")}


def plot_scores(scores: xr.Dataset, *, variables: Sequence[str] | None = None,
                sets: dict[str, Sequence[Head]] | None = None) -> Figure:
    """One heat map per (block, head) variable (default: all of them), with the heads of ``sets`` marked."""
    names = list(variables or [v for v in scores.data_vars if scores[v].dims == ("block", "head")])
    figure = Figure(figsize=(2.2 + 2.0 * len(names), 0.9 + 0.22 * scores.sizes["block"]), layout="constrained")
    axes = figure.subplots(1, len(names), squeeze=False)[0]
    for ax, name in zip(axes, names):
        image = ax.imshow(scores[name].transpose("block", "head").values, aspect="auto", cmap="viridis",
                          origin="lower")
        figure.colorbar(image, ax=ax, shrink=0.8)
        ax.set(title=name, xlabel="head", ylabel="block", xticks=scores["head"].values)
        for set_name, heads in (sets or {}).items():
            marker, color = SET_MARKERS.get(set_name, ("^", "white"))
            if heads:
                blocks, cols = zip(*heads)
                style = {"c": color} if marker == "x" else {"facecolors": "none", "edgecolors": color}
                ax.scatter(cols, blocks, marker=marker, label=set_name, s=40, **style)
    if sets:
        axes[0].legend(loc="upper left", fontsize="small", framealpha=0.8)
    return figure


def plot_accuracy(table: pd.DataFrame) -> Figure:
    """Bars of accuracy (whole vocabulary) and label-restricted accuracy for each setting of the study."""
    figure = Figure(figsize=(8, 3.6), layout="constrained")
    ax = figure.subplots()
    x = np.arange(len(table))
    for offset, column in ((-0.2, "accuracy"), (0.2, "label_accuracy")):
        ax.bar(x + offset, table[column].values, width=0.4, label=column.replace("_", " "))
    ax.set_xticks(x, table.index, rotation=25, ha="right")
    ax.set(ylim=(0, 1), ylabel="accuracy")
    ax.legend()
    return figure


def plot_changes(changes: pd.DataFrame, measures: Sequence[str] | None = None) -> Figure:
    """Per measure, the change (intervention minus baseline) over layers, one line per intervention group."""
    names = list(measures or changes["measure"].unique())
    cols = min(4, len(names))
    rows = int(np.ceil(len(names) / cols))
    figure = Figure(figsize=(3.4 * cols, 2.6 * rows), layout="constrained")
    axes = figure.subplots(rows, cols, squeeze=False).ravel()
    for ax, name in zip(axes, names):
        for group, frame in changes[changes["measure"] == name].groupby("group", sort=False):
            ax.plot(frame["layer"], frame["change"], label=f"{group} - {frame['baseline'].iloc[0]}")
        ax.axhline(0, color="grey", lw=0.8)
        ax.set(title=LABELS.get(name, (name,))[0], xlabel="layer", ylabel="change")
    for ax in axes[len(names):]:
        ax.set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncols=len(labels), fontsize="small")
    figure.suptitle("Change of each measure under each intervention (intervention minus its baseline)")
    return figure


def plot_study(study: "HeadStudy", out: str | Path, formats: Iterable[str] = FORMATS) -> list[Path]:
    """Write the study's figures into folder ``out``: head_scores, accuracy and (with measures) measure_changes."""
    formats = tuple(formats)
    paths = save(plot_scores(study.scores, sets=study.sets), out, "head_scores", formats)
    paths += save(plot_accuracy(study.accuracy), out, "accuracy", formats)
    if study.changes is not None:
        paths += save(plot_changes(study.changes), out, "measure_changes", formats)
    return paths
