"""Benchmark: geometry of a store 4x larger than the workers' memory limit, against the in-memory path on one that fits.

Stores as written by ``benchmarks/geometry_statistics.py`` (``LAYERS`` x ``DIM`` float32 states, 2 classes, written
chunk by chunk; narrower than there, so that a chunk's statistics stay small next to the workers' limit). Each
measurement runs in a fresh child process (the cheap measures, ``N_BOOT`` resamples):

- ``in_memory``: ``measure(engine="states")`` (one whole layer in memory at a time) on a store of ``N`` examples;
- ``cluster_small``: ``measure(engine="statistics")`` on a ``LocalCluster`` of 2 single-threaded worker processes,
  each limited to ``--memory-limit`` (default 256 MiB), on the same store;
- ``cluster_big``: the same cluster on a store whose states take 4x the memory limit.

Reported per run: seconds, throughput (examples per second, all layers), peak resident memory of the client
process and of the largest worker (``ru_maxrss`` of each worker process, read at the end); then the ratios. The
last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:] = [str(HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != HERE]

from benchmarks.geometry_statistics import MEASURES, N_BOOT, write_store  # noqa: E402

LAYERS, DIM, N = 4, 64, 8_000


def _peak_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(mode: str, path: str, limit: str) -> None:
    """Measure the group in one mode; print seconds and peak memory (MiB) of the client and the workers."""
    import xarray as xr

    from geometry import measure

    ds = xr.open_zarr(path, group="g", consolidated=False)
    kwargs = dict(measures=MEASURES, n_boot=N_BOOT, progress=False)
    workers: dict = {}
    if mode == "in_memory":
        start = time.perf_counter()
        measure(ds, engine="states", **kwargs)
        seconds = time.perf_counter() - start
    else:
        import distributed

        with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                      memory_limit=limit) as cluster, distributed.Client(cluster) as client:
            start = time.perf_counter()
            measure(ds, engine="statistics", **kwargs)
            seconds = time.perf_counter() - start
            workers = client.run(_peak_mib)
    print(json.dumps({"seconds": seconds, "client_peak_mib": _peak_mib(),
                      "worker_peak_mib": max(workers.values(), default=None), "workers_alive": len(workers)}))


def run_child(mode: str, path: Path, limit: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", mode, str(path), limit], capture_output=True,
                         text=True, check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(limit: str) -> None:
    from dask.utils import parse_bytes

    n_big = 4 * parse_bytes(limit) // (LAYERS * DIM * 4)
    report: dict = {"layers": LAYERS, "dim": DIM, "n_boot": N_BOOT, "memory_limit": limit, "workers": 2,
                    "threads_per_worker": 1, "load_average": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory() as folder:
        small, big = Path(folder) / "small.zarr", Path(folder) / "big.zarr"
        write_store(small, N, layers=LAYERS, dim=DIM)
        write_store(big, n_big, layers=LAYERS, dim=DIM)
        for mode, path, n in (("in_memory", small, N), ("cluster_small", small, N), ("cluster_big", big, n_big)):
            run = run_child(mode, path, limit)
            report[mode] = {"n": n, "store_mib": round(n * LAYERS * DIM * 4 / 2**20),
                            "seconds": round(run["seconds"], 2), "examples_per_s": round(n / run["seconds"]),
                            "client_peak_mib": round(run["client_peak_mib"]),
                            "worker_peak_mib": run["worker_peak_mib"] and round(run["worker_peak_mib"]),
                            "workers_alive": run["workers_alive"]}
            print(json.dumps({mode: report[mode]}), flush=True)
    report["cluster_big_over_in_memory_throughput"] = round(
        report["cluster_big"]["examples_per_s"] / report["in_memory"]["examples_per_s"], 2)
    report["cluster_small_over_in_memory_throughput"] = round(
        report["cluster_small"]["examples_per_s"] / report["in_memory"]["examples_per_s"], 2)
    print(json.dumps(report))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(*sys.argv[2:5])
    else:
        parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
        parser.add_argument("--memory-limit", default="256MiB", help="memory limit of each worker (default: 256MiB)")
        main(parser.parse_args().memory_limit)
