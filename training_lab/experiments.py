"""Experiment sets: several lab configurations (clamp runs, data sweeps) in one TOML file, trained one after another,
each as one batched multi-seed run in its own run directory ``<out>/<configuration name>/``, resumably.

An experiment file (the shipped ones are in ``training_lab/experiments/``; :func:`experiment_names` lists them)::

    description = "what the set asks"
    preset = "singh"                 # every configuration starts from this lab preset
    seeds = [0, 1, 2, 3, 4]          # each configuration trains these seeds at once
    [quick]                          # what --quick changes (tests, a first look): a preset and/or the seeds
    preset = "singh-quick"
    seeds = [0, 1, 2]
    [train]                          # optional [task] / [model] / [train] keys for every configuration
    snapshots_per_decade = 10
    [circuits]                       # named clamp sets, each a list of [[clamp]] tables (training_lab.clamps)
    A = [{ point = "attn.pattern", value = "previous_token", blocks = [0] }]
    [[configuration]]
    name = "A"                       # its run directory's name
    circuits = ["A"]                 # its clamps: the named sets' specs, in order
    task = { n_classes = 100 }       # optional: its own [task] / [model] / [train] keys

A configuration's lab config is the preset, then the file's sections, then the configuration's own, then the seeds,
the named clamp sets and the command line's ``steps`` / ``seeds``; every configuration is built (and so validated)
when the file is loaded, so a bad one fails in one line before any training. Changing what a circuit clamps is one
line in ``[circuits]``.
"""

from __future__ import annotations

import json
import re
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from training_lab.config import LabConfig, overlay, preset
from training_lab.errors import LabError
from training_lab.train import train

#: Where the shipped experiment files live.
EXPERIMENT_DIR = Path(__file__).parent / "experiments"
#: The record of an experiment directory: its name, description and configurations in order.
RECORD, TIMINGS = "experiment.json", "timings.json"
SECTIONS = ("task", "model", "train")
TOP_KEYS = {"description", "preset", "seeds", "quick", "circuits", "configuration", *SECTIONS}
CONFIGURATION_KEYS = {"name", "circuits", *SECTIONS}
QUICK_KEYS = {"preset", "seeds"}
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+=-]*")


@dataclass(frozen=True)
class Experiment:
    """A loaded experiment: its ``name`` (the file's stem), ``description`` and one lab config per configuration
    name, in the file's order."""

    name: str
    description: str
    configurations: dict[str, LabConfig]


def experiment_names() -> list[str]:
    """The shipped experiments, by name."""
    return sorted(path.stem for path in EXPERIMENT_DIR.glob("*.toml"))


def experiment_path(source: str | Path) -> Path:
    """The file of ``source``: a path to a TOML file, or a shipped experiment's name."""
    path = Path(source)
    if path.is_file():
        return path
    shipped = EXPERIMENT_DIR / f"{source}.toml"
    if shipped.is_file():
        return shipped
    raise LabError(f"no experiment file or shipped experiment {str(source)!r}; shipped experiments: "
                   f"{', '.join(experiment_names())}")


def _unknown(keys: Any, valid: set[str], where: str) -> None:
    extra = set(keys) - valid
    if extra:
        raise LabError(f"unknown key(s) {sorted(extra)} in {where}; valid keys: {sorted(valid)}")


def _clamp_sets(raw: Any, where: str) -> dict[str, list[dict[str, Any]]]:
    if not isinstance(raw, dict) or not all(isinstance(v, list) and all(isinstance(c, dict) for c in v)
                                            for v in raw.values()):
        raise LabError(f"{where}: [circuits] must map names to lists of clamp tables, e.g. A = [{{ point = "
                       "\"attn.pattern\", value = \"previous_token\", blocks = [0] }]")
    return raw


def _configuration(entry: Any, base: dict[str, Any], circuits: dict[str, list[dict[str, Any]]],
                   where: str) -> tuple[str, LabConfig]:
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise LabError(f"{where}: every [[configuration]] needs a name = \"...\"")
    name = entry["name"]
    if not NAME.fullmatch(name):
        raise LabError(f"{where}: configuration name {name!r} must be letters, digits and _ . + = - (it names a "
                       "directory)")
    _unknown(entry, CONFIGURATION_KEYS, f"{where} [[configuration]] {name!r}")
    unknown = [c for c in entry.get("circuits", []) if c not in circuits]
    if unknown:
        raise LabError(f"{where}: configuration {name!r} names unknown circuit {unknown[0]!r}; [circuits] defines "
                       f"{', '.join(circuits) or 'none'}")
    data = overlay(base, {s: entry[s] for s in SECTIONS if s in entry}, f"{where} configuration {name!r}")
    clamps = [dict(spec) for circuit in entry.get("circuits", []) for spec in circuits[circuit]]
    if clamps:
        data["clamp"] = clamps
    try:
        return name, LabConfig.from_dict(data)
    except LabError as error:
        raise LabError(f"{where}: configuration {name!r}: {error}") from error
    except (TypeError, ValueError) as error:
        raise LabError(f"{where}: configuration {name!r}: a value has the wrong type ({error})") from error


def load_experiment(source: str | Path, *, quick: bool = False, seeds: Sequence[int] | None = None,
                    steps: int | None = None) -> Experiment:
    """Load and validate the experiment ``source`` (a TOML file or a shipped name); ``quick`` applies its
    ``[quick]`` table; ``seeds`` and ``steps`` override every configuration's."""
    path = experiment_path(source)
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise LabError(f"{path} is not valid TOML: {error}") from error
    where = path.name
    _unknown(raw, TOP_KEYS, where)
    scale = raw.get("quick", {}) if quick else {}
    _unknown(scale, QUICK_KEYS, f"{where} [quick]")
    base = overlay(preset(scale.get("preset", raw.get("preset", "singh"))).to_dict(),
                   {s: raw[s] for s in SECTIONS if s in raw}, where)
    chosen = seeds if seeds is not None else scale.get("seeds", raw.get("seeds"))
    base["train"].update({k: v for k, v in (("seeds", chosen), ("steps", steps)) if v is not None})
    circuits = _clamp_sets(raw.get("circuits", {}), where)
    entries = raw.get("configuration", [])
    if not entries:
        raise LabError(f"{where} has no [[configuration]]; add at least one (name = \"free\")")
    configurations: dict[str, LabConfig] = {}
    for entry in entries:
        name, config = _configuration(entry, base, circuits, where)
        if name in configurations:
            raise LabError(f"{where}: configuration {name!r} appears twice; give each its own name")
        configurations[name] = config
    return Experiment(path.stem, str(raw.get("description", "")), configurations)


def _record(experiment: Experiment) -> dict[str, Any]:
    return {"name": experiment.name, "description": experiment.description,
            "configurations": list(experiment.configurations)}


def claim(experiment: Experiment, out: Path) -> None:
    """Write ``out/experiment.json``, or check that ``out`` already holds this experiment."""
    path, record = out / RECORD, _record(experiment)
    if path.is_file():
        held = json.loads(path.read_text())
        if (held["name"], held["configurations"]) != (record["name"], record["configurations"]):
            raise LabError(f"{out} holds another experiment ({held['name']}: {', '.join(held['configurations'])});"
                           " pass another --out")
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1))


def read_record(out: str | Path) -> dict[str, Any]:
    """The record of the experiment directory ``out`` (name, description, configurations)."""
    path = Path(out) / RECORD
    if not path.is_file():
        raise LabError(f"no experiment at {out} (no {RECORD}); run one with --experiment NAME --out {out}")
    return json.loads(path.read_text())


def run_experiment(experiment: Experiment, out: str | Path, *, progress: bool = True,
                   say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train every configuration of ``experiment`` into ``out/<name>/`` (resuming each; a finished one costs only
    its set-up) and return the wall seconds of this call, per configuration and in total, also written to
    ``out/timings.json``."""
    out = Path(out)
    claim(experiment, out)
    timings: dict[str, Any] = {"configurations": {}, "total": 0.0}
    start = time.perf_counter()
    for i, (name, config) in enumerate(experiment.configurations.items(), 1):
        if say is not None:
            say(f"configuration {i}/{len(experiment.configurations)}: {name} ({len(config.train.seeds)} seeds, "
                f"{config.train.steps} steps)")
        began = time.perf_counter()
        train(config, out / name, progress=progress)
        timings["configurations"][name] = time.perf_counter() - began
        timings["total"] = time.perf_counter() - start
        (out / TIMINGS).write_text(json.dumps(timings, indent=1))
    return timings
