"""How the geometry sweep's time grows with the number of queries n (issue 9, item 12).

Synthetic groups shaped like Gemma 3 270M's (19 layers x 640 dims, two classes, float32) with n = 64, 256 and
1,000 queries are measured in memory by :func:`geometry.measure` with the study's defaults (1,000 resamples, 10
separability refits, threads). The last line printed is one JSON object: seconds per n, and the machine's load
average (the machine may be shared).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

# This script's folder shadows the ``geometry`` package when run as ``python benchmarks/n_scaling.py``.
HERE = Path(__file__).resolve().parent
sys.path[:] = [str(HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != HERE]

import numpy as np  # noqa: E402
import xarray as xr  # noqa: E402

from geometry import measure  # noqa: E402

LAYERS, DIM, SIZES = 19, 640, (64, 256, 1000)


def synthetic_group(n: int, rng: np.random.Generator) -> xr.Dataset:
    """A group in the store's schema: two classes half a unit apart in every dimension, random lens tokens."""
    labels = np.arange(n) % 2
    rows = rng.normal(size=(2, DIM)).astype(np.float32)
    hidden = (rng.normal(size=(n, LAYERS, DIM)) + 0.5 * labels[:, None, None]).astype(np.float32)
    return xr.Dataset(
        {"hidden": (("example", "layer", "dim"), hidden), "label": ("example", labels),
         "unembed": (("class", "dim"), rows), "lens_unembed": (("class", "dim"), rows),
         "lens_bias": ("class", np.zeros(2, np.float32)), "label_token": ("class", np.array([5, 6])),
         "lens_top_token": (("example", "layer"), rng.integers(0, 9, (n, LAYERS)))},
        coords={"layer": np.arange(LAYERS)}, attrs={"setting": "icl"},
    )


def main() -> None:
    rng = np.random.default_rng(0)
    seconds = {}
    for n in SIZES:
        group = synthetic_group(n, rng)
        started = time.perf_counter()
        measure(group, n_boot=1000, n_boot_separability=10, progress=False, parallel="threads")
        seconds[n] = round(time.perf_counter() - started, 2)
    print(json.dumps({"sweep_seconds_by_n": seconds, "layers": LAYERS, "dim": DIM, "classes": 2,
                      "load_average": round(os.getloadavg()[0], 2)}))


if __name__ == "__main__":
    main()
