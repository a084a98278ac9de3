"""The run store: one Zarr v3 store per run (``<run>/run.zarr``), read with xarray, consolidated metadata at the
root. Its layout is documented in :mod:`training_lab` (the package docstring).

Arrays are created whole, NaN-filled, when a run starts (every evaluation and snapshot step is known from the
config); each step's values are then written in place with a ``done`` flag written last, so a resumed run
rewrites exactly the steps after its checkpoint and nothing else. A run re-started with a larger ``train.steps``
(every other setting equal) is extended: its groups grow along ``step`` by the new schedule's later steps, NaN-filled
and not done, and the stored config is replaced last, so an extension killed midway is simply redone.
"""

from __future__ import annotations

import logging
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
GROWABLE = "train.steps"
log = logging.getLogger(__name__)


def _changed(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    keys = []
    for section in sorted(set(old) | set(new)):
        a, b = old.get(section, {}), new.get(section, {})
        if not (isinstance(a, dict) and isinstance(b, dict)):
            keys += [section] if a != b else []
            continue
        keys += [f"{section}.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return keys


def stored_config(path: Path) -> dict[str, Any] | None:
    """The config of the run store at ``path`` (keys added to the configs since read as their defaults), or None
    when there is no store or its creation was killed before its last write."""
    if not (path / "zarr.json").exists():
        return None
    with reading(path):
        stored = open_root(path).attrs.get("config")
    return None if stored is None else LabConfig.from_dict(stored).to_dict()


def check_config(path: Path, config: dict[str, Any]) -> dict[str, Any] | None:
    """The stored config of the run at ``path`` (None: a new run) if ``config`` may continue it: the same config,
    or one that only raises ``train.steps`` (an extension); anything else fails in one line."""
    stored = stored_config(path)
    if stored is None or canonical(stored) == canonical(config):
        return stored
    changed = _changed(stored, config)
    if changed != [GROWABLE] or config["train"]["steps"] < stored["train"]["steps"]:
        raise LabError(f"the run at {path.parent} was started with another config (differs in {', '.join(changed)});"
                       f" only {GROWABLE} can grow (to extend the run): pass the same config to resume, a larger "
                       "train.steps to extend, or another out")
    return stored


def steps(path: Path, group: str) -> np.ndarray:
    """The ``step`` coordinate of one group of the store at ``path``."""
    return np.asarray(open_root(path)[group]["step"][:])


def create(path: Path, config: dict[str, Any], datasets: dict[str, xr.Dataset]) -> None:
    """Create the store with its NaN-filled groups (the config attr written last); or check that an existing one
    holds the same config; or, when ``config`` only raises ``train.steps``, grow its groups to ``datasets``' steps
    (see :func:`check_config`)."""
    stored = check_config(path, config)
    if stored is not None and canonical(stored) == canonical(config):
        return
    if stored is not None:
        log.info("extending run from %d to %d steps", stored["train"]["steps"], config["train"]["steps"])
        _grow(path, stored["train"]["steps"], datasets)
        open_root(path, mode="a").attrs["config"] = config
        consolidate(path)
        return
    path.mkdir(parents=True, exist_ok=True)
    zarr.open_group(str(path), mode="w", zarr_format=3)
    for name, dataset in datasets.items():
        dataset.to_zarr(str(path), group=name, mode="w", consolidated=False, zarr_format=3)
    root = open_root(path, mode="a")
    root.attrs.update({"config": config, "provenance": library_versions(LIBRARIES), "format": FORMAT})
    consolidate(path)


def _grow(path: Path, last: int, datasets: dict[str, xr.Dataset]) -> None:
    """Lengthen every group's step arrays to ``datasets``' steps, whose steps up to ``last`` (the run's last step
    so far) must be the stored ones; the new entries read as the arrays' fill values (NaN, not done). Re-running
    it after a kill redoes it: the stored steps up to ``last`` are never touched."""
    root = open_root(path, mode="a")
    for name, dataset in datasets.items():
        node, target = root[name], dataset["step"].values
        kept = int(np.searchsorted(target, last, side="right"))
        if not np.array_equal(node["step"][:kept], target[:kept]):
            raise LabError(f"cannot extend the run at {path.parent}: its {name} steps up to {last} differ from the "
                           "longer schedule's; train the longer run into another out")
        for variable, values in dataset.data_vars.items():
            if "step" in values.dims:
                node[variable].resize((len(target),) + node[variable].shape[1:])
        node["step"].resize((len(target),))
        node["step"][kept:] = target[kept:]


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
