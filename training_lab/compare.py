"""Compare lab runs side by side (an experiment's configurations): [S]'s phase-change time per run with an interval
over its seeds, loss and induction strength over training, as tidy tables, two figures and ``compare.html``.

Only completed steps are read, so an experiment still training can be compared at any time. Written into the
experiment directory ``out`` (:func:`compare_experiment`) or any folder (:func:`compare`):

- ``tables/phase_changes.csv``: configuration, seed, phase_change_step (the first evaluation with held-out loss
  < 0.4 ln 2; empty: not reached), final_loss, final_induction_strength (the strongest last-block head at the last
  snapshot);
- ``tables/comparison.csv`` and ``comparison.json``: per configuration n_seeds, n_reached, mean_step, ci_low,
  ci_high (:data:`INTERVAL`), sd_step, final_loss and final_induction_strength (seed means) and its setting;
- ``tables/curves.csv``: configuration, step, seed, loss, accuracy (every evaluation);
- ``tables/induction.csv``: configuration, step, seed, block, head, induction_strength (every snapshot);
- ``figures/compare_loss`` and ``figures/compare_induction`` (PNG and SVG) and ``compare.html``;
- with ``geometry=True``, how each configuration's clamps change the query's geometry over training:
  ``tables/geometry.csv`` (configuration, step, seed, site, measure, value) and ``figures/compare_<measure>`` for
  :data:`GEOMETRY_MEASURES` at the read-out's site (the linear read-out's input aligned to its label rows, or the
  MLP read-out's hidden layer to its last layer's rows; see :mod:`training_lab.geometry_over_training`).
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr
from scipy import stats

from icl_geometry.report import html_page, html_table, image_tag
from training_lab import figures
from training_lab.errors import LabError
from training_lab.experiments import read_record
from training_lab.geometry_over_training import run_geometry
from training_lab.induction import PHASE_CHANGE_LOSS, induction_strength, phase_change_step
from training_lab.store import open_run

TABLES, FIGURES, PAGE, SUMMARY = "tables", "figures", "compare.html", "comparison.json"
CONFIDENCE = 0.95
#: The measures compared over training per configuration (at the read-out's site).
GEOMETRY_MEASURES = ("separability", "variance_alignment", "mean_alignment")
INTERVAL = ("95% Student t interval of the mean phase-change step over the seeds that reached it (n_reached; "
            "none with fewer than two)")


def _done(dataset: xr.Dataset) -> xr.Dataset:
    return dataset.isel(step=np.flatnonzero(dataset["done"].values)).load()


def _strongest(strength: xr.DataArray) -> xr.DataArray:
    """The strongest head of the last block (step, seed): [S] reads induction in the second layer's heads."""
    return strength.isel(block=-1).max("head")


def summarise(per_seed: pd.DataFrame, confidence: float = CONFIDENCE) -> pd.DataFrame:
    """Per configuration (in order of appearance): n_seeds, n_reached, mean_step with a Student t interval over the
    seeds that reached the phase change, sd_step, and the seed means of final_loss and final_induction_strength."""
    rows = []
    for name, group in per_seed.groupby("configuration", sort=False):
        reached = group["phase_change_step"].dropna().to_numpy(dtype=float)
        n = len(reached)
        mean = reached.mean() if n else math.nan
        sd = reached.std(ddof=1) if n > 1 else math.nan
        half = stats.t.ppf(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n) if n > 1 else math.nan
        rows.append({"configuration": name, "n_seeds": len(group), "n_reached": n, "mean_step": mean,
                     "ci_low": mean - half, "ci_high": mean + half, "sd_step": sd,
                     "final_loss": group["final_loss"].mean(),
                     "final_induction_strength": group["final_induction_strength"].mean()})
    return pd.DataFrame(rows)


def _describe_clamp(clamp: dict[str, Any]) -> str:
    """A stored clamp in words: its point and value (or its named circuit), indices and strength."""
    parts = [f"circuit {clamp['circuit']}" if clamp.get("circuit") else f"{clamp['point']} = {clamp.get('value')}"]
    parts += [f"{key} {clamp[key]}" for key in ("blocks", "heads", "positions") if clamp.get(key)]
    if clamp.get("value") == "induction" or clamp.get("circuit") == "B":
        parts.append(f"s = {clamp.get('strength', 1.0)}")
    return " ".join(parts)


def settings(configs: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Each run's setting in words: its keys that differ from the first run's (seeds aside) and its clamps."""
    reference = next(iter(configs.values()), {})
    described = {}
    for name, config in configs.items():
        changed = [f"{section}.{key} = {value}" for section in ("task", "model", "train")
                   for key, value in config.get(section, {}).items()
                   if key != "seeds" and reference.get(section, {}).get(key) != value]
        clamps = [_describe_clamp(c) for c in config.get("clamp", [])]
        described[name] = "; ".join(changed + clamps) or "no clamps"
    return described


def _run_frames(name: str, run: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, xr.DataArray,
                                               xr.DataArray]:
    """One run's per-seed phase changes, curves and induction tables, and its loss and strongest-head curves."""
    curves = _done(open_run(run))
    snapshots = _done(open_run(run, "snapshots"))
    strength = induction_strength(snapshots)
    strongest = _strongest(strength)
    last = strongest.isel(step=-1) if strongest.sizes["step"] else xr.full_like(curves["loss"].isel(step=0), np.nan)
    per_seed = pd.DataFrame({"configuration": name, "seed": curves["seed"].values,
                             "phase_change_step": phase_change_step(curves).values,
                             "final_loss": curves["loss"].isel(step=-1).values,
                             "final_induction_strength": last.values})
    table = curves[["loss", "accuracy"]].to_dataframe().reset_index()[["step", "seed", "loss", "accuracy"]]
    induction = strength.to_dataframe().reset_index()[["step", "seed", "block", "head", "induction_strength"]]
    return (per_seed, table.assign(configuration=name), induction.assign(configuration=name), curves["loss"],
            strongest)


def _readout_geometry(run: Path) -> xr.Dataset:
    """:data:`GEOMETRY_MEASURES` over training at the read-out's site (the last ``layer`` entry), no intervals."""
    measured = run_geometry(open_run(run, "snapshots"), measures=GEOMETRY_MEASURES, n_boot=0)
    return measured.isel(layer=-1)


def _geometry_part(runs: dict[str, Path], out: Path, marks: dict[str, float]) -> list[str]:
    """Write the geometry table and figures of the runs; return the page's section."""
    measured = {name: _readout_geometry(run) for name, run in runs.items()}
    rows = [m["value"].to_dataframe().reset_index().assign(configuration=name)[
        ["configuration", "step", "seed", "site", "measure", "value"]] for name, m in measured.items()]
    pd.concat(rows, ignore_index=True).to_csv(out / TABLES / "geometry.csv", index=False)
    site = next(iter(measured.values()))["site"].item()
    images = []
    for name in GEOMETRY_MEASURES:
        figures.plot_runs_compared({run: m["value"].sel(measure=name) for run, m in measured.items()}, out / FIGURES,
                                   name=f"compare_{name}", title=f"{name.replace('_', ' ')} at the {site}",
                                   ylabel=name.replace("_", " "), marks=marks)
        images.append(image_tag(out / FIGURES / f"compare_{name}.png", f"{name} over training per configuration"))
    return ["<h2>Geometry over training</h2>",
            f"<p>How each configuration's clamps change the query's geometry at the {html.escape(site)}: "
            "separability of the query's label (a probe's held-out accuracy) and alignment to the read-out's label "
            "rows, per snapshot step (dotted: mean phase-change step). Every value is in "
            f"<code>{TABLES}/geometry.csv</code>.</p>",
            "<div style='display:flex;gap:0.5em;flex-wrap:wrap'>" + "".join(images) + "</div>"]


def _front(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[["configuration", *[c for c in frame.columns if c != "configuration"]]]


def compare(runs: dict[str, Path], out: str | Path, *, title: str = "Runs compared", description: str = "",
            missing: list[str] | None = None, geometry: bool = False) -> Path:
    """Compare the run directories ``runs`` (name -> directory, each with at least one completed evaluation),
    writing the tables, figures and page of the module doc into ``out``; returns the page's path. ``geometry``
    adds each run's geometry over training (about a second per snapshot step and seed)."""
    out = Path(out)
    frames = {name: _run_frames(name, Path(run)) for name, run in runs.items()}
    per_seed = pd.concat([f[0] for f in frames.values()], ignore_index=True)
    summary = summarise(per_seed)
    configs = {name: open_run(run).attrs["config"] for name, run in runs.items()}
    summary["setting"] = summary["configuration"].map(settings(configs))
    tables = out / TABLES
    tables.mkdir(parents=True, exist_ok=True)
    per_seed.to_csv(tables / "phase_changes.csv", index=False)
    summary.to_csv(tables / "comparison.csv", index=False)
    _front(pd.concat([f[1] for f in frames.values()])).to_csv(tables / "curves.csv", index=False)
    _front(pd.concat([f[2] for f in frames.values()])).to_csv(tables / "induction.csv", index=False)
    records = json.loads(summary.to_json(orient="records"))  # NaN -> null
    (out / SUMMARY).write_text(json.dumps({"title": title, "threshold_loss": PHASE_CHANGE_LOSS, "interval": INTERVAL,
                                           "configurations": records}, indent=1))
    marks = dict(zip(summary["configuration"], summary["mean_step"]))
    figures.plot_runs_compared({n: f[3] for n, f in frames.items()}, out / FIGURES, name="compare_loss",
                               title="Held-out query loss (dotted: mean phase-change step)", ylabel="loss",
                               threshold=PHASE_CHANGE_LOSS, marks=marks)
    figures.plot_runs_compared({n: f[4] for n, f in frames.items()}, out / FIGURES, name="compare_induction",
                               title="Induction strength (strongest last-block head)",
                               ylabel="correct - wrong label attention")
    extra = _geometry_part({name: Path(run) for name, run in runs.items()}, out, marks) if geometry else []
    path = out / PAGE
    path.write_text(html_page(title, _page(title, description, summary, per_seed, out, missing or []) + extra))
    return path


def _page(title: str, description: str, summary: pd.DataFrame, per_seed: pd.DataFrame, out: Path,
          missing: list[str]) -> list[str]:
    seeds = per_seed.groupby("configuration", sort=False)["seed"].count()
    return [
        f"<h1>{html.escape(title)}</h1>",
        f"<p>{html.escape(description)}</p>" if description else "",
        f"<p class='muted'>{len(summary)} configuration(s), {seeds.max()} seed(s) each at most. Every number is in "
        f"<code>{TABLES}/</code>, every figure in <code>{FIGURES}/</code>.</p>",
        f"<p class='muted'>Not trained yet: {html.escape(', '.join(missing))}.</p>" if missing else "",
        "<h2>Phase-change times</h2>", html_table(summary),
        f"<p class='muted'>Phase-change step: [S]'s rule, the first evaluation with held-out loss below 0.4 ln 2 = "
        f"{PHASE_CHANGE_LOSS:.3f}. Interval: {html.escape(INTERVAL)}; seeds that never reached it are counted in "
        "n_seeds but not in the mean, so with n_reached &lt; n_seeds the mean understates the time. final_loss and "
        "final_induction_strength: seed means at the last evaluation and snapshot.</p>",
        "<h2>Over training</h2>",
        "<div style='display:flex;gap:0.5em'>"
        + image_tag(out / FIGURES / "compare_loss.png", "held-out loss over training per configuration")
        + image_tag(out / FIGURES / "compare_induction.png", "induction strength over training per configuration")
        + "</div>",
        "<p class='muted'>Thick lines: seed means; thin: each seed. Induction strength (query attention to the "
        "correct minus the wrong label) is read at the snapshot steps; a clamped pattern shows its clamped "
        "value.</p>",
        "<h2>Per seed</h2>", html_table(per_seed),
    ]


def compare_experiment(out: str | Path, *, geometry: bool = False) -> Path:
    """Compare the configurations of the experiment in ``out`` that have completed evaluations (see
    :func:`compare`, also for ``geometry``); the others are named on the page as not trained yet."""
    out = Path(out)
    record = read_record(out)
    runs, missing = {}, []
    for name in record["configurations"]:
        run = out / name
        if (run / "run.zarr" / "zarr.json").is_file() and open_run(run)["done"].values.any():
            runs[name] = run
        else:
            missing.append(name)
    if not runs:
        raise LabError(f"no configuration of the experiment at {out} has a completed evaluation yet; train it "
                       "first")
    return compare(runs, out, title=f"Experiment {record['name']}: phase-change times",
                   description=record["description"], missing=missing, geometry=geometry)
