"""Analyse a lab run from its store alone (:func:`analyse`): circuit metrics, phases, each phase's circuit and
the geometry over training, written as tidy CSV tables, figures and one self-contained ``report.html``.

Only completed steps (``done``) are read, so a run still training (or killed) can be analysed at any time and
re-analysed later. Written into the run directory ``out``:

- ``tables/curves.csv``: step, seed, loss, accuracy, train_loss, phase, in_transition, boundary;
- ``tables/circuits.csv``: step, seed, block, and [M]'s bigram, label_attention, chunk_example (from the mean
  attention pattern over the held-out set at every evaluation step);
- ``tables/phases.csv``: seed, phase, start (its first step), circuit, n_steps (evaluations outside transitions
  that name the circuit), accuracy (their mean);
- ``tables/phase_metrics.csv``: seed, phase, block, and the circuit metrics' means over the phase's measured steps
  outside transitions (what names its circuit, :func:`training_lab.phases.phase_circuits`);
- ``tables/geometry.csv``: step, seed, layer, site, measure, value, ci_low, ci_high (snapshot steps);
- ``figures/``: training curves with transitions shaded, circuit metrics, attention maps at each phase's start,
  measures over training (PNG and SVG);
- ``report.html``: all of it on one page.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from icl_geometry.config import dump_toml
from icl_geometry.report import html_page, html_table, image_tag
from training_lab import figures
from training_lab.circuits import METRICS, circuit_metrics, heads_mean, single_head
from training_lab.config import LabConfig
from training_lab.errors import LabError
from training_lab.geometry_over_training import run_geometry
from training_lab.phases import detect_phases, phase_circuits
from training_lab.store import open_run

TABLES, FIGURES, REPORT = "tables", "figures", "report.html"


@dataclass(frozen=True)
class Analysis:
    """What :func:`analyse` computed (the tables are written from these)."""

    curves: xr.Dataset
    metrics: xr.Dataset
    phases: xr.Dataset
    circuits: xr.Dataset
    geometry: xr.Dataset | None
    report: Path


def _done(dataset: xr.Dataset) -> xr.Dataset:
    return dataset.isel(step=np.flatnonzero(dataset["done"].values)).load()


def _curves_table(curves: xr.Dataset, phases: xr.Dataset) -> pd.DataFrame:
    columns = [curves[name] for name in ("loss", "accuracy", "train_loss")]
    columns += [phases[name] for name in ("phase", "in_transition", "boundary")]
    return xr.merge(columns, compat="override").to_dataframe().reset_index()[
        ["step", "seed", "loss", "accuracy", "train_loss", "phase", "in_transition", "boundary"]]


def _circuits_table(metrics: xr.Dataset) -> pd.DataFrame:
    frame = single_head(metrics)[list(METRICS)].to_dataframe().reset_index()
    return frame[["step", "seed", "block", *METRICS]]


def _phases_table(phases: xr.Dataset, circuits: xr.Dataset) -> pd.DataFrame:
    rows = []
    for seed in circuits["seed"].values:
        per_seed = phases.sel(seed=seed)
        steady = ~per_seed["in_transition"].values
        for p in circuits["phase"].values:
            start = float(circuits["phase_start"].sel(seed=seed, phase=p))
            if not np.isfinite(start):
                continue
            chosen = steady & (per_seed["phase"].values == p)
            rows.append({"seed": int(seed), "phase": int(p), "start": int(start),
                         "circuit": str(circuits["circuit"].sel(seed=seed, phase=p).item()),
                         "n_steps": int(circuits["n_steps"].sel(seed=seed, phase=p)),
                         "accuracy": float(per_seed["accuracy"].values[chosen].mean()) if chosen.any() else np.nan})
    return pd.DataFrame(rows, columns=["seed", "phase", "start", "circuit", "n_steps", "accuracy"])


def _phase_metrics_table(circuits: xr.Dataset) -> pd.DataFrame:
    named = circuits["n_steps"] > 0
    frame = circuits[list(METRICS)].where(named).to_dataframe().dropna().reset_index()
    return frame[["seed", "phase", "block", *METRICS]]


def _geometry_table(geometry: xr.Dataset) -> pd.DataFrame:
    frame = geometry[["value", "ci_low", "ci_high"]].to_dataframe().reset_index()
    return frame[["step", "seed", "layer", "site", "measure", "value", "ci_low", "ci_high"]]


def analyse(out: str | Path, *, smooth: int = 5, window: int = 100, threshold: float = 0.025, rise: float = 0.1,
            geometry: bool = True, n_boot: int = 100, progress: Any = None) -> Analysis:
    """Analyse the run in ``out`` (its completed steps) and write ``tables/``, ``figures/`` and ``report.html``
    there (see the module doc). ``window`` and ``threshold`` are [M]'s phase rule; ``smooth`` (an odd number of
    evaluations) the moving average it is applied to (:func:`training_lab.phases.detect_phases`); ``rise`` the
    metrics' rise over the previous phase that names a new circuit (:func:`training_lab.phases.phase_circuits`);
    ``geometry``
    False skips the geometry measures (the slowest part: about a second per snapshot step and seed);
    ``n_boot`` is their bootstrap resamples. ``progress(message)``, when given, is told each stage."""
    out = Path(out)
    say = progress or (lambda message: None)
    curves = _done(open_run(out))
    if curves.sizes["step"] < 2:
        raise LabError(f"the run at {out} has {curves.sizes['step']} completed evaluation(s); train it further "
                       "before analysing")
    say("circuit metrics and phases")
    patterns = heads_mean(curves["mean_pattern"])
    metrics = circuit_metrics(patterns)
    phases = detect_phases(curves["accuracy"], window=window, threshold=threshold, smooth=smooth)
    circuits = phase_circuits(metrics, phases, rise=rise)
    measured = None
    if geometry:
        say("geometry over training")
        measured = run_geometry(open_run(out, "snapshots"), n_boot=n_boot)
    tables, figure_dir = out / TABLES, out / FIGURES
    tables.mkdir(parents=True, exist_ok=True)
    _curves_table(curves, phases).to_csv(tables / "curves.csv", index=False)
    _circuits_table(metrics).to_csv(tables / "circuits.csv", index=False)
    _phases_table(phases, circuits).to_csv(tables / "phases.csv", index=False)
    _phase_metrics_table(circuits).to_csv(tables / "phase_metrics.csv", index=False)
    if measured is not None:
        _geometry_table(measured).to_csv(tables / "geometry.csv", index=False)
    say("figures")
    figures.plot_training_curves(curves["accuracy"], figure_dir, loss=curves["loss"], phases=phases,
                                 circuits=circuits)
    figures.plot_circuit_metrics(metrics, figure_dir, phases=phases)
    figures.plot_attention_maps(patterns, phases, figure_dir, circuits=circuits)
    if measured is not None:
        figures.plot_measures_over_training(measured, figure_dir, phases=phases)
    report = write_lab_report(out)
    return Analysis(curves, metrics, phases, circuits, measured, report)


def _read(out: Path, name: str) -> pd.DataFrame:
    path = out / TABLES / name
    return pd.read_csv(path) if path.is_file() else pd.DataFrame()


def phase_sentences(out: str | Path) -> list[str]:
    """One sentence per seed of an analysed run: its phases in order with their circuits and accuracies."""
    curves, phases = _read(Path(out), "curves.csv"), _read(Path(out), "phases.csv")
    last = curves.sort_values("step").groupby("seed").tail(1).set_index("seed")
    sentences = []
    for seed, rows in phases.groupby("seed"):
        parts = [f"phase {r.phase} from step {r.start}: {str(r.circuit).replace('_', ' ')}"
                 + ("" if pd.isna(r.accuracy) else f" (accuracy {r.accuracy:.2f})") for r in rows.itertuples()]
        final = last.loc[seed]
        sentences.append(f"Seed {seed}: {len(rows)} phase(s) by step {int(final.step)} ({'; '.join(parts)}); final "
                         f"held-out accuracy {final.accuracy:.3f}, loss {final.loss:.3f}.")
    return sentences


def _alignment_text(readout: str) -> str:
    """What the alignment measures are aligned to, by read-out kind."""
    if readout == "linear":
        return "alignment to the label unembeddings (the linear read-out's rows) at every residual layer."
    return ("alignment to the read-out's last-layer rows on the read-out's hidden layer (the read-out is an MLP, "
            "not an unembedding).")


def _heads_note(n_heads: int) -> str:
    """Say that the circuits of a model with several heads per block are those of the heads' mean pattern."""
    if n_heads == 1:
        return ""
    return (f"<p class='muted'>Each block has {n_heads} heads: the circuit metrics and attention maps are of the "
            f"mean over the {n_heads} heads' patterns (the metrics are linear in the pattern, so this is the heads' "
            "mean metric).</p>")


def write_lab_report(out: str | Path) -> Path:
    """Build ``report.html`` in a run directory from its store's config and its ``tables/`` and ``figures/``."""
    out = Path(out)
    attrs = open_run(out).attrs
    config, curves, phases = attrs["config"], _read(out, "curves.csv"), _read(out, "phases.csv")
    figure_dir = out / FIGURES
    task, train = config["task"], config["train"]
    body = [
        "<h1>Training lab: circuits and geometry over training</h1>",
        f"<p class='muted'>Run <code>{html.escape(str(out))}</code>: {len(train['seeds'])} seed(s), "
        f"{int(curves.step.max()) if not curves.empty else 0} of {train['steps']} steps analysed. Every number "
        f"below is in <code>{TABLES}/</code>; every figure in <code>{FIGURES}/</code>.</p>",
        f"<p>A small attention-only transformer learns [M]'s in-context task (T = {task['n_tasks']} label maps, "
        f"K = {task['n_classes']} classes, L = {task['n_labels']} labels, N = {task['n_pairs']} pairs). "
        "[M] finds training in <b>phases</b>: plateaus of the held-out accuracy separated by abrupt rises, each "
        "plateau with its own attention <b>circuit</b> (<i>bigram</i>: the query attends to itself; <i>label "
        "attention</i>: layer 1's query attends to the context's labels; <i>chunk example</i>: layer 1's labels "
        "attend to their items and layer 2's query to the labels). The geometry section applies the toolkit's "
        "measures to the query's hidden states at stored steps, a view none of the papers shows.</p>",
        "<h2>Phases</h2><ul class='findings'>",
        *[f"<li>{html.escape(sentence)}</li>" for sentence in phase_sentences(out)],
        "</ul>", html_table(phases),
        "<p class='muted'>Rule: a boundary where Acc(t + window) - Acc(t) > threshold, on a moving average of the "
        "accuracy; consecutive boundaries merge into one transition (shaded in the figures). A phase's circuit "
        "and accuracy are the means over its evaluations outside transitions.</p>",
        image_tag(figure_dir / "training_curves.png", "accuracy and loss over training"),
        "<h2>Circuits</h2>", _heads_note(config["model"]["n_heads"]), image_tag(figure_dir / "circuit_metrics.png", "circuit metrics over training"),
        image_tag(figure_dir / "attention_maps.png", "attention maps at the start of each phase"),
        "<h2>Geometry over training</h2>",
        "<p>Separability (a linear probe's held-out accuracy on the query's label) and effective dimension at "
        f"every residual layer; {_alignment_text(config['model'].get('readout', 'mlp'))}</p>",
        image_tag(figure_dir / "measures_over_training.png", "geometry measures over training"),
        "<h2>Configuration</h2><pre>" + html.escape(dump_toml(LabConfig.from_dict(config))) + "</pre>",
    ]
    path = out / REPORT
    path.write_text(html_page("Training lab run", body))
    return path
