"""Smoke tests of the training figures on a synthetic run with [M]'s three phases (each writes PNG and SVG), and
the analysis chain that feeds them: patterns -> metrics -> phases -> circuits."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from training_lab.circuits import circuit_metrics
from training_lab.figures import (plot_attention_maps, plot_circuit_metrics, plot_measures_over_training,
                                  plot_training_curves, position_names)
from training_lab.geometry_over_training import geometry_over_training
from training_lab.phases import detect_phases, phase_circuits

N, SIZE = 4, 9
STEPS = np.concatenate([[0], np.unique(np.round(np.logspace(0, 4, 120)).astype(int))])
STORED = np.array([0, 100, 1000, 3000, 5000, 7000, 9000])


def accuracy(steps: np.ndarray, shift: float) -> np.ndarray:
    """About 1/3, then 0.75 after step 2,000 + shift, then 1.0 after 6,000 + shift (abrupt rises)."""
    return 0.33 + 0.42 * (steps >= 2000 + shift) + 0.25 * (steps >= 6000 + shift)


def pattern(circuit: str) -> np.ndarray:
    """(block, query, key) patterns of a circuit; rows not named by the circuit attend uniformly and causally."""
    p = np.tile(np.tril(np.ones((SIZE, SIZE))) / np.arange(1, SIZE + 1)[:, None], (2, 1, 1))
    if circuit == "bigram":
        p[:, 8] = np.eye(SIZE)[8]
    elif circuit == "label_attention":
        p[0, 8] = np.isin(np.arange(SIZE), [1, 3, 5, 7]) / 4
        p[1, 8] = np.eye(SIZE)[8]
    else:
        p[0, [1, 3, 5, 7]] = np.eye(SIZE)[[0, 2, 4, 6]]
        p[1, 8] = np.isin(np.arange(SIZE), [1, 3, 5, 7]) / 4
    return p


@pytest.fixture(scope="module")
def run():
    seeds = [0, 1]
    curves = xr.DataArray(np.stack([accuracy(STEPS, 0), accuracy(STEPS, 500)], axis=1), dims=("step", "seed"),
                          coords={"step": STEPS, "seed": seeds})
    loss = -np.log(curves.clip(0.05, 0.99))
    circuit_at = {0: "bigram", 100: "bigram", 1000: "bigram", 3000: "label_attention", 5000: "label_attention",
                  7000: "chunk_example", 9000: "chunk_example"}
    patterns = np.stack([pattern(circuit_at[s]) for s in STORED])  # (step, block, query, key); the store adds a head
    patterns = np.broadcast_to(patterns[:, None, :, None, None], (len(STORED), 2, 2, 1, 3, SIZE, SIZE))
    patterns = xr.DataArray(patterns, dims=("step", "seed", "block", "head", "example", "query", "key"),
                            coords={"step": STORED, "seed": seeds})
    phases = detect_phases(curves, method="next")
    metrics = circuit_metrics(patterns)
    return dict(curves=curves, loss=loss, patterns=patterns, phases=phases, metrics=metrics,
                circuits=phase_circuits(metrics, phases))


def test_the_chain_names_the_three_circuits_in_order(run):
    assert list(run["phases"]["n_transitions"].values) == [2, 2]
    for seed in (0, 1):
        assert list(run["circuits"]["circuit"].sel(seed=seed).values) == ["bigram", "label_attention",
                                                                          "chunk_example"]


def written(paths, tmp_path, name):
    assert sorted(p.name for p in paths) == [f"{name}.png", f"{name}.svg"]
    assert all(p.parent == tmp_path and p.stat().st_size > 1000 for p in paths)


def test_training_curves(run, tmp_path):
    paths = plot_training_curves(run["curves"], tmp_path, loss=run["loss"], phases=run["phases"],
                                 circuits=run["circuits"])
    written(paths, tmp_path, "training_curves")
    written(plot_training_curves(run["curves"].values[:, 0], tmp_path, steps=STEPS, name="plain"), tmp_path, "plain")


def test_circuit_metrics_figure(run, tmp_path):
    written(plot_circuit_metrics(run["metrics"], tmp_path, phases=run["phases"]), tmp_path, "circuit_metrics")


def test_attention_maps(run, tmp_path):
    paths = plot_attention_maps(run["patterns"], run["phases"], tmp_path, seed=1, circuits=run["circuits"])
    written(paths, tmp_path, "attention_maps")


def test_measures_over_training(run, tmp_path):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 8)
    H = rng.normal(size=(len(STORED), 1, 3, len(labels), 6))
    H[3:, :, 2] += 4 * np.eye(4, 6)[labels]
    result = geometry_over_training(H, labels, steps=STORED, measures=("separability", "effective_dimension"),
                                    n_boot=10)
    written(plot_measures_over_training(result, tmp_path, phases=run["phases"].sel(seed=[0])), tmp_path,
            "measures_over_training")


def test_position_names():
    assert position_names(2) == ["x1", "y1", "x2", "y2", "q"]
