"""Geometry over training on synthetic states whose answer is known: classes that become separable (and aligned
with the read-out) from a given step on."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import xarray as xr

from geometry.errors import MeasureError
from training_lab.geometry_over_training import geometry_over_training, run_geometry
from training_lab.store import open_run
from training_lab.train import train

STEPS = [0, 100, 1000]
CLASSES, PER_CLASS, DIM = 4, 16, 8
LABELS = np.repeat(np.arange(CLASSES), PER_CLASS)


def states(separable_from: int) -> xr.DataArray:
    """(step, seed, layer, example, dim): noise, plus well-separated class means at layer 2 from step index
    ``separable_from`` on; layer 1 lies on a line (effective dimension about 1)."""
    rng = np.random.default_rng(0)
    H = rng.normal(size=(len(STEPS), 2, 3, len(LABELS), DIM))
    H[:, :, 1] = rng.normal(size=(len(STEPS), 2, len(LABELS), 1)) * np.ones(DIM)
    means = 10 * rng.normal(size=(CLASSES, DIM))
    H[separable_from:, :, 2] += means[LABELS]
    return xr.DataArray(H, dims=("step", "seed", "layer", "example", "dim"), coords={"step": STEPS, "seed": [3, 4]})


def readout(aligned_from: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows e_c of the last linear layer (step, seed, class, unit) and hidden layers (step, seed, example, unit)
    that lean towards their own label's row from step index ``aligned_from`` on."""
    rng = np.random.default_rng(1)
    rows = np.tile(np.eye(CLASSES, DIM), (len(STEPS), 2, 1, 1))
    hidden = np.abs(rng.normal(size=(len(STEPS), 2, len(LABELS), DIM)))
    hidden[aligned_from:] += 5 * np.eye(CLASSES, DIM)[LABELS]
    return rows, hidden


def test_separability_rises_where_and_when_the_classes_separate():
    result = geometry_over_training(states(separable_from=1), LABELS, measures=("separability",
                                                                                "effective_dimension"), n_boot=20)
    assert result["value"].dims == ("step", "seed", "layer", "measure")
    sep = result["value"].sel(measure="separability")
    assert float(sep.sel(layer=2, step=[100, 1000]).min()) == 1.0
    assert float(sep.sel(layer=2, step=0).max()) < 0.7
    assert float(sep.sel(layer=0).max()) < 0.7
    dim = result["value"].sel(measure="effective_dimension")
    assert float(dim.sel(layer=1).max()) == pytest.approx(1.0)
    assert float(dim.sel(layer=0).min()) > 4
    ci = result.sel(measure="effective_dimension")
    assert bool((ci["ci_low"] <= ci["ci_high"]).all())
    assert np.isnan(result["ci_low"].sel(measure="separability")).all()  # n_boot_separability = 0: no CI
    assert list(result["site"].values) == ["embedding", "after block 0", "after block 1"]


def test_alignment_is_measured_on_the_readout_hidden_layer():
    rows, hidden = readout(aligned_from=2)
    rows = xr.DataArray(rows, dims=("step", "seed", "class", "unit"))  # the run store's names
    hidden = xr.DataArray(hidden, dims=("step", "seed", "example", "unit"))
    result = geometry_over_training(states(1), LABELS, readout_rows=rows, readout_hidden_states=hidden, n_boot=20)
    assert list(result["layer"].values) == [0, 1, 2, 3]
    assert str(result["site"].sel(layer=3).values) == "readout hidden"
    mean = result["value"].sel(measure="mean_alignment")
    assert float(mean.sel(layer=3, step=1000).min()) > 3
    assert float(abs(mean.sel(layer=3, step=[0, 100])).max()) < 1
    assert np.isnan(mean.sel(layer=[0, 1, 2])).all()  # the rows do not live in the residual stream
    assert float(result["value"].sel(measure="separability", layer=3, step=1000).min()) == 1.0


def test_numpy_states_and_per_seed_labels():
    H = states(0).values
    result = geometry_over_training(H, np.stack([LABELS, LABELS]), measures=("separability",), steps=STEPS)
    assert list(result["step"].values) == STEPS and list(result["seed"].values) == [0, 1]
    assert float(result["value"].sel(layer=2).min()) == 1.0


def test_labels_too_rare_to_split_are_left_out():
    labels = LABELS.copy()
    labels[0] = 9  # one query with a label of its own: it cannot be in both the training and the held-out part
    result = geometry_over_training(states(1), labels, measures=("separability",), n_boot=0)
    assert list(result["n_examples"].values) == [len(labels) - 1] * 2
    assert list(result["n_labels"].values) == [CLASSES] * 2
    assert float(result["value"].sel(layer=2, step=1000).min()) == 1.0
    assert result.attrs["min_per_label"] == 2


def test_run_geometry_reads_states_and_readout_hidden_layer_from_the_run_store(tiny, tmp_path):
    config = replace(tiny, train=replace(tiny.train, snapshot_examples=32))
    train(config, tmp_path / "run", progress=False)
    snapshots = open_run(tmp_path / "run", "snapshots")
    result = run_geometry(snapshots, measures=("separability", "mean_alignment"), n_boot=0)
    assert list(result["step"].values) == list(snapshots["step"].values)
    assert list(result["site"].values)[-1] == "readout hidden"
    assert np.isfinite(result["value"].sel(measure="mean_alignment").isel(layer=-1)).all()
    assert np.isnan(result["value"].sel(measure="mean_alignment").isel(layer=0)).all()


def test_rows_without_a_step_dim_serve_every_step():
    rows, hidden = readout(aligned_from=2)
    shared = geometry_over_training(states(1), LABELS, readout_rows=rows[0], readout_hidden_states=hidden,
                                    measures=("mean_alignment",), n_boot=0)
    assert float(shared["value"].sel(layer=3, step=1000).min()) > 3


def test_alignment_without_the_readout_is_refused():
    with pytest.raises(MeasureError, match="readout_rows"):
        geometry_over_training(states(0), LABELS, measures=("mean_alignment",))
    rows, hidden = readout(0)
    with pytest.raises(MeasureError, match="do not fit"):
        geometry_over_training(states(0), LABELS, readout_rows=rows, readout_hidden_states=hidden[:, :, :10])
    with pytest.raises(MeasureError, match="unknown measure"):
        geometry_over_training(states(0), LABELS, measures=("output_alignment",))
