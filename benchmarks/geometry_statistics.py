"""Benchmark of geometry from sufficient statistics (``measure(..., engine="statistics")``) against the in-memory sweep.

Synthetic groups in the store schema (``LAYERS`` layers x ``DIM`` dims, float32, 2 classes) are written to Zarr
chunk by chunk (never held whole) at N and 4N examples. Each measurement runs in a fresh child process, so its peak
resident memory (``ru_maxrss``) is its own: the cheap measures (all but separability and the denoising gain) with
``N_BOOT`` resamples,

- ``states``: the default engine (one whole layer read into memory at a time);
- ``statistics``: per-chunk sufficient statistics reduced by Dask's default (threaded) scheduler.

Reported: throughput in examples x layers per second, the statistics-over-states speed ratio at 4N, the peak
memory of each engine at N and 4N and its 4N/N ratio (flat means ~1), and the largest difference of the values.
The last line printed is one JSON object.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:] = [str(HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != HERE]

import numpy as np  # noqa: E402

LAYERS, DIM, N, CHUNK, N_BOOT = 4, 256, 16_000, 2_000, 200
MEASURES = ["output_alignment", "singular_alignment", "variance_alignment", "mean_alignment",
            "composite_alignment", "effective_dimension"]


def write_store(path: Path, n: int, seed: int = 0, layers: int = LAYERS, dim: int = DIM) -> None:
    """A group ``g`` at ``path`` with n examples, written one chunk of examples at a time."""
    import zarr

    rng = np.random.default_rng(seed)
    root = zarr.open_group(str(path), mode="w")
    group = root.create_group("g")
    hidden = group.create_array("hidden", shape=(n, layers, dim), chunks=(CHUNK, 1, dim), dtype="float32",
                                dimension_names=("example", "layer", "dim"))
    label = group.create_array("label", shape=(n,), chunks=(CHUNK,), dtype="int32", dimension_names=("example",))
    top = group.create_array("lens_top_token", shape=(n, layers), chunks=(CHUNK, 1), dtype="int64",
                             dimension_names=("example", "layer"))
    unembed = rng.normal(size=(2, dim)).astype(np.float32)
    for name, dims, values in (("unembed", ("class", "dim"), unembed), ("label_token", ("class",), np.array([5, 6])),
                               ("layer", ("layer",), np.arange(layers)), ("class", ("class",), np.array([0, 1]))):
        group.create_array(name, shape=values.shape, dtype=values.dtype, dimension_names=dims)[...] = values
    scale = (1.0 + np.arange(dim)) ** -0.5
    for start in range(0, n, CHUNK):
        stop = min(start + CHUNK, n)
        y = np.arange(start, stop) % 2
        states = rng.normal(size=(stop - start, layers, dim)) * scale
        states += np.linspace(0, 1, layers)[None, :, None] * unembed[y][:, None, :] + 10
        hidden[start:stop] = states.astype(np.float32)
        label[start:stop] = y
        top[start:stop] = np.where(rng.random((stop - start, layers)) < 0.5, 5 + y[:, None], 0)


def child(engine: str, path: str) -> None:
    """Measure the group with one engine; print seconds, peak RSS (MiB) and the values."""
    import xarray as xr

    from geometry import measure

    ds = xr.open_zarr(path, group="g", consolidated=False)
    start = time.perf_counter()
    result = measure(ds, measures=MEASURES, n_boot=N_BOOT, progress=False, engine=engine)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "peak_mib": peak, "values": result["value"].values.tolist()}))


def run_child(engine: str, path: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", engine, str(path)], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    report: dict = {"layers": LAYERS, "dim": DIM, "chunk": CHUNK, "n_boot": N_BOOT, "measures": MEASURES,
                    "load_average": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory() as folder:
        runs = {}
        for n in (N, 4 * N):
            path = Path(folder) / f"s{n}.zarr"
            write_store(path, n)
            for engine in ("states", "statistics"):
                run = run_child(engine, path)
                runs[(engine, n)] = run
                report[f"{engine}_{n}"] = {"seconds": round(run["seconds"], 2), "peak_mib": round(run["peak_mib"]),
                                           "examples_layers_per_s": round(n * LAYERS / run["seconds"])}
                print(json.dumps({engine: n, **report[f"{engine}_{n}"]}), flush=True)
    big = 4 * N
    diff = np.nanmax(np.abs(np.array(runs[("states", big)]["values"]) - np.array(runs[("statistics", big)]["values"])))
    report.update({
        "statistics_over_states_speed_4n": round(runs[("states", big)]["seconds"] / runs[("statistics", big)]["seconds"],
                                                 2),
        "states_memory_4n_over_n": round(runs[("states", big)]["peak_mib"] / runs[("states", N)]["peak_mib"], 2),
        "statistics_memory_4n_over_n": round(runs[("statistics", big)]["peak_mib"] / runs[("statistics", N)]["peak_mib"],
                                             2),
        "max_abs_value_difference": float(diff),
    })
    print(json.dumps(report))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2], sys.argv[3])
    else:
        main()
