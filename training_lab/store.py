"""The run store: one Zarr v3 store per run (``<run>/run.zarr``), read with xarray, consolidated metadata at the
root. Its layout is documented in :mod:`training_lab` (the package docstring).

Arrays are created whole, NaN-filled, when a run starts (every evaluation and snapshot step is known from the
config); each step's values are then written in place with a ``done`` flag written last, so a resumed run
rewrites exactly the steps after its checkpoint and nothing else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
import zarr

from extraction.store import canonical, consolidate, library_versions, open_root, reading
from training_lab.config import LabConfig
from training_lab.errors import LabError

GROUPS = ("curves", "snapshots")
FORMAT = "training_lab.run/1"
LIBRARIES = ("torch", "numpy", "xarray", "zarr", "safetensors")


def _changed(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    keys = []
    for section in sorted(set(old) | set(new)):
        a, b = old.get(section, {}), new.get(section, {})
        if not (isinstance(a, dict) and isinstance(b, dict)):
            keys += [section] if a != b else []
            continue
        keys += [f"{section}.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return keys


def create(path: Path, config: dict[str, Any], datasets: dict[str, xr.Dataset]) -> None:
    """Create the store with its NaN-filled groups (the config attr written last), or check that an existing one
    holds the same config (a stored config lacking keys added later reads them as their defaults)."""
    if (path / "zarr.json").exists():
        with reading(path):
            stored = open_root(path).attrs.get("config")  # None: a creation killed before its last write
        if stored is not None:
            stored = LabConfig.from_dict(stored).to_dict()  # keys added to the configs since keep their defaults
        if stored is not None and canonical(stored) != canonical(config):
            raise LabError(f"the run at {path.parent} was started with another config (differs in "
                           f"{', '.join(_changed(stored, config))}); pass the same config to resume, or another out")
        if stored is not None:
            return
    path.mkdir(parents=True, exist_ok=True)
    zarr.open_group(str(path), mode="w", zarr_format=3)
    for name, dataset in datasets.items():
        dataset.to_zarr(str(path), group=name, mode="w", consolidated=False, zarr_format=3)
    root = open_root(path, mode="a")
    root.attrs.update({"config": config, "provenance": library_versions(LIBRARIES), "format": FORMAT})
    consolidate(path)


def write_step(path: Path, group: str, index: int, values: dict[str, np.ndarray]) -> None:
    """Write one step's values (arrays without the step dimension) at position ``index``, then its ``done`` flag."""
    node = open_root(path, mode="a")[group]
    for name, value in values.items():
        node[name][index] = value
    node["done"][index] = True


def done_steps(path: Path, group: str) -> np.ndarray:
    return np.asarray(open_root(path)[group]["done"][:], dtype=bool)


def open_run(path: str | Path, group: str = "curves") -> xr.Dataset:
    """Open one group of a run store (the run directory or its ``run.zarr``) lazily, with the root attrs."""
    path = Path(path)
    store = path if path.suffix == ".zarr" else path / "run.zarr"
    if not (store / "zarr.json").exists():
        raise LabError(f"no lab run store at {store}; train one with training_lab.train(config, out=...)")
    if group not in GROUPS:
        raise LabError(f"unknown run store group {group!r}; valid groups: {', '.join(GROUPS)}")
    with reading(store):
        dataset = xr.open_zarr(str(store), group=group, consolidated=False)
        dataset.attrs.update(open_root(store).attrs.asdict())
    return dataset
