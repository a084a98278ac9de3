"""Benchmark of the geometry suite: vectorised bootstrap against a plain per-layer, per-resample, per-pair loop.

Synthetic stores in the project's schema (19 layers x 2,000 queries x 640 dims, float32, as Gemma 3 270M gives)
are built in memory for a binary and a 6-class task. Timed in the same run:

- ``suite_seconds``: :func:`geometry.measure` with every measure and 1,000 bootstrap resamples (separability:
  its default 50 refits), default parallelism; its CPU time too, since the machine may be shared (the load
  average is recorded);
- the cheap measures (all but separability) vectorised, serially with single-threaded BLAS, against the loop a
  user would write: for each layer and resample, index the resampled queries and call the public pure functions
  for each label pair (also single-threaded). The loop is timed on a few resamples of a few layers and
  extrapolated to 1,000 resamples x 19 layers (stated in the JSON).

The last line printed is one JSON object.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

# This script's folder shadows the ``geometry`` package when run as ``python benchmarks/geometry.py``: drop it and
# import the package from this checkout.
HERE = Path(__file__).resolve().parent
sys.path[:] = [str(HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != HERE]

import numpy as np  # noqa: E402
import xarray as xr  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

from geometry import kernels, measure  # noqa: E402
from geometry.bootstrap import resample_counts  # noqa: E402
from geometry.measures import (alignment_by_pair, denoising_hits, effective_dimension, lens_hits,  # noqa: E402
                               prepare_alignment)
from geometry.names import MEASURES  # noqa: E402

LAYERS, EXAMPLES, DIM, N_BOOT = 19, 2000, 640, 1000
LOOP_LAYERS, LOOP_RESAMPLES = (4, 14), 3
CHEAP = [m for m in MEASURES if m != "separability"]
SEED = 0


def synthetic_group(classes: int, seed: int = SEED) -> xr.Dataset:
    """A group in the store schema: class structure that separates early and turns towards the label rows late,
    on top of anisotropic (power-law spectrum) noise."""
    rng = np.random.default_rng(seed)
    y = np.arange(EXAMPLES) % classes
    unembed = rng.normal(size=(classes, DIM)).astype(np.float32)
    basis = np.linalg.qr(rng.normal(size=(DIM, DIM)))[0]
    scale = (1.0 + np.arange(DIM)) ** -0.6 * 4
    other = rng.normal(size=(classes, DIM))
    hidden = np.empty((EXAMPLES, LAYERS, DIM), dtype=np.float32)
    for layer in range(LAYERS):
        separate = min(1.0, layer / 6)
        align = 1 / (1 + np.exp(-(layer - 12)))
        centres = separate * (1 - align) * other + align * 0.3 * unembed
        hidden[:, layer] = (rng.normal(size=(EXAMPLES, DIM)) * scale) @ basis.T + centres[y] + 20 * (layer + 1)
    tokens = np.arange(classes) + 100
    lens_pred = (hidden @ unembed.T).argmax(axis=2)
    top = np.where(rng.random(lens_pred.shape) < 0.5, tokens[lens_pred], 7)
    return xr.Dataset(
        {
            "hidden": (("example", "layer", "dim"), hidden), "label": (("example",), y.astype(np.int32)),
            "unembed": (("class", "dim"), unembed), "lens_unembed": (("class", "dim"), unembed * 1.1),
            "lens_bias": (("class",), np.zeros(classes, dtype=np.float32)),
            "label_token": (("class",), tokens), "lens_top_token": (("example", "layer"), top),
            "correct": (("example",), top[:, -1] == tokens[y]),
            "label_logits": (("example", "class"), hidden[:, -1] @ unembed.T),
        },
        coords={"class": [f"c{k}" for k in range(classes)], "layer": np.arange(LAYERS)},
        attrs={"setting": f"synthetic_{classes}", "lens_center": False},
    )


def loop_one(H: np.ndarray, y: np.ndarray, ds: xr.Dataset, top: np.ndarray) -> None:
    """Every cheap measure of one resample, pair by pair, through the public pure functions."""
    U = ds["unembed"].values
    for a in range(U.shape[0]):
        for b in range(a + 1, U.shape[0]):
            rows = (y == a) | (y == b)
            alignment_by_pair(H[rows], y[rows], U)
    effective_dimension(H)
    lens_hits(top, y, ds["label_token"].values).mean()
    denoising_hits(H, y, ds["lens_unembed"].values, ds["lens_bias"].values, rank=10)


def time_loop(ds: xr.Dataset) -> tuple[float, float]:
    """Seconds per (layer, resample) of the loop, and the largest gap between the vectorised singular alignment
    (Ritz subspace, default size) and the loop's exact value on the same resamples."""
    y = ds["label"].values
    counts = resample_counts(y, N_BOOT, np.random.default_rng(SEED))[:LOOP_RESAMPLES]
    elapsed, gap = 0.0, 0.0
    for layer in LOOP_LAYERS:
        H = ds["hidden"].values[:, layer].astype(np.float64)
        top = ds["lens_top_token"].values[:, layer]
        inputs = prepare_alignment(H, y, ds["unembed"].values)
        fast = kernels.singular_alignment_batch(inputs.X, inputs.y, inputs.directions, inputs.pairs, counts, 16)
        for b, row in enumerate(counts):
            index = np.repeat(np.arange(len(y)), row.astype(int))
            started = time.perf_counter()
            loop_one(H[index], y[index], ds, top[index])
            elapsed += time.perf_counter() - started
            exact = alignment_by_pair(H[index], y[index], ds["unembed"].values).singular
            gap = max(gap, float(np.abs(fast[b] - exact).max()))
    return elapsed / (len(LOOP_LAYERS) * LOOP_RESAMPLES), gap


def run_case(classes: int) -> dict:
    ds = synthetic_group(classes)
    started, cpu = time.perf_counter(), time.process_time()
    suite = measure(ds, n_boot=N_BOOT, seed=SEED, progress=False)
    suite_seconds, suite_cpu = time.perf_counter() - started, time.process_time() - cpu
    with threadpool_limits(limits=1, user_api="blas"):
        started = time.perf_counter()
        measure(ds, measures=CHEAP, n_boot=N_BOOT, seed=SEED, progress=False, parallel="serial")
        cheap_seconds = time.perf_counter() - started
        per_step, gap = time_loop(ds)
    loop_seconds = per_step * N_BOOT * LAYERS
    return {
        "classes": classes, "label_pairs": classes * (classes - 1) // 2,
        "suite_seconds": round(suite_seconds, 2), "suite_cpu_seconds": round(suite_cpu, 2),
        "parallel": suite.attrs["parallel"],
        "cheap_vectorised_seconds_single_thread": round(cheap_seconds, 2),
        "loop_seconds_extrapolated_single_thread": round(loop_seconds, 1),
        "loop_seconds_per_layer_resample": round(per_step, 4),
        "vectorised_over_loop": round(loop_seconds / cheap_seconds, 1),
        "singular_alignment_ritz16_max_abs_error": gap,
        "composite_alignment_last_layer": round(float(suite["value"].sel(layer=LAYERS - 1,
                                                                          measure="composite_alignment")), 4),
    }


def main() -> None:
    load_before = os.getloadavg()[0]
    cases = {"binary": run_case(2), "six_class": run_case(6)}
    result = {
        "benchmark": "geometry suite, synthetic stores in memory",
        "shape": {"layers": LAYERS, "examples": EXAMPLES, "dim": DIM}, "n_boot": N_BOOT,
        "n_boot_separability": 50, "cpu_count": os.cpu_count(),
        "load_average_1min": {"start": round(load_before, 2), "end": round(os.getloadavg()[0], 2)}, "cases": cases,
        "suite_seconds": round(sum(c["suite_seconds"] for c in cases.values()), 2),
        "suite_seconds_means": "sum over the binary and the 6-class case, every measure, 1,000 resamples",
        "vectorised_over_loop": min(c["vectorised_over_loop"] for c in cases.values()),
        "vectorised_over_loop_means": (
            "smaller of the two cases: loop time over vectorised time for the cheap measures (all but "
            f"separability), both single-threaded; the loop was timed on {LOOP_RESAMPLES} resamples x "
            f"{len(LOOP_LAYERS)} layers and extrapolated to {N_BOOT} resamples x {LAYERS} layers"
        ),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
