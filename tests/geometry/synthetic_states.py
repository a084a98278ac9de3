"""Synthetic query-state datasets for the statistics-engine tests (a stand-in for a store group, in memory)."""

import numpy as np
import xarray as xr

#: The measures the statistics engine computes from moments alone.
FROM_STATISTICS = ["output_alignment", "singular_alignment", "variance_alignment", "mean_alignment",
                   "composite_alignment", "effective_dimension"]


def synthetic_states(n: int = 300, layers: int = 2, dim: int = 10, classes: int = 3, seed: int = 0, *,
                     separation: float = 2.0, decay: float = 0.0) -> xr.Dataset:
    """States ``N(0, diag((1 + axis) ** -2 decay))`` plus ``separation`` on the class's own axis, offset 5, with
    random label rows and lens tokens: the variables a store group holds."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    scale = (1.0 + np.arange(dim)) ** -decay
    H = rng.normal(size=(n, layers, dim)) * scale + separation * np.eye(classes, dim)[y][:, None, :] + 5
    return xr.Dataset(
        {"hidden": (("example", "layer", "dim"), H), "label": (("example",), y),
         "unembed": (("class", "dim"), rng.normal(size=(classes, dim))),
         "lens_top_token": (("example", "layer"), rng.integers(0, classes, (n, layers))),
         "label_token": (("class",), np.arange(classes))},
        coords={"layer": np.arange(layers), "class": [f"c{i}" for i in range(classes)]})
