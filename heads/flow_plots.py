"""Heat maps of an edge scan (:func:`heads.flow.edge_scan`): layer window x edge type, each cell annotated with its
value and bootstrap interval."""

from __future__ import annotations

import numpy as np
import xarray as xr
from matplotlib.figure import Figure

#: Panels of the heat map: quantity -> title.
PANELS = {"accuracy_change": "accuracy change (label-restricted)", "logit_change": "gold label logit change"}


def plot_flow(ds: xr.Dataset, title: str | None = None) -> Figure:
    """One panel per :data:`PANELS` quantity: rows are windows (blocks first-last), columns edge types, colour the
    mean change (diverging, centred at 0), text the mean and its interval."""
    windows = [f"{int(w)}-{int(last)}" for w, last in zip(ds["window"].values, ds["window_last"].values)]
    patch = ds.attrs.get("mode") == "patch"
    done = f"patched from donor {ds.attrs.get('donor')}" if patch else "knocked out"
    edges = [str(e) for e in ds["edge"].values]
    fig = Figure(figsize=(2.2 + 1.3 * len(edges) * len(PANELS), 1.2 + 0.45 * len(windows)))
    axes = fig.subplots(1, len(PANELS), squeeze=False)
    for ax, (name, label) in zip(axes[0], PANELS.items()):
        label = ds.attrs.get(f"panel_{name}", label)  # a pair scan names its own quantities
        values = ds[name].transpose("window", "edge").values
        low = ds[f"{name}_low"].transpose("window", "edge").values
        high = ds[f"{name}_high"].transpose("window", "edge").values
        scale = float(np.nanmax(np.abs(values))) or 1.0
        image = ax.imshow(values, cmap="RdBu_r", vmin=-scale, vmax=scale, aspect="auto")
        for (i, j), value in np.ndenumerate(values):
            ax.text(j, i, f"{value:+.2f}\n[{low[i, j]:+.2f}, {high[i, j]:+.2f}]", ha="center", va="center",
                    fontsize=6, color="white" if abs(value) > 0.6 * scale else "black")
        ax.set_xticks(range(len(edges)), edges, rotation=30, ha="right")
        ax.set_yticks(range(len(windows)), windows)
        ax.set_xlabel(f"edge {done} (senders -> receivers)")
        ax.set_ylabel("blocks of the window")
        ax.set_title(label, fontsize=9)
        fig.colorbar(image, ax=ax, shrink=0.8)
    level = ds.attrs.get("ci_level", 0.95)
    fig.suptitle(title or f"Edge {'patching' if patch else 'knockout'}, {ds.attrs.get('width')}-block windows "
                 f"(clean accuracy {ds.attrs.get('clean_accuracy', float('nan')):.2f}; {level:.0%} intervals)",
                 fontsize=10)
    fig.tight_layout()
    return fig
