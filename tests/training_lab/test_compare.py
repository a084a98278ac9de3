"""Comparison of an experiment's configurations: phase-change times with t intervals over seeds, tidy tables,
figures of loss and induction strength over training, and the side-by-side page."""

import json
import math
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from training_lab.compare import compare_experiment, settings, summarise
from training_lab.errors import LabError
from training_lab.experiments import load_experiment, run_experiment

from tests.training_lab.experiment_files import TINY


def test_summary_is_a_t_interval_over_the_seeds_that_reached_the_phase_change():
    per_seed = pd.DataFrame({
        "configuration": ["a"] * 4 + ["b"] * 2 + ["c"] * 2,
        "seed": [0, 1, 2, 3, 0, 1, 0, 1],
        "phase_change_step": [100, 200, 300, np.nan, 50, np.nan, np.nan, np.nan],
        "final_loss": [0.1, 0.2, 0.3, 0.7, 0.1, 0.7, 0.7, 0.7],
        "final_induction_strength": [0.9] * 8,
    })
    summary = summarise(per_seed).set_index("configuration")
    assert list(summary.index) == ["a", "b", "c"]  # the configurations' order is kept
    a = summary.loc["a"]
    half = stats.t.ppf(0.975, 2) * np.std([100, 200, 300], ddof=1) / math.sqrt(3)
    assert (a.n_seeds, a.n_reached, a.mean_step) == (4, 3, 200)
    assert a.ci_low == pytest.approx(200 - half) and a.ci_high == pytest.approx(200 + half)
    assert summary.loc["b"].n_reached == 1 and summary.loc["b"].mean_step == 50
    assert np.isnan(summary.loc["b"].ci_low) and np.isnan(summary.loc["c"].mean_step)
    assert summary.loc["a"].final_loss == pytest.approx(0.325)


def test_settings_name_what_differs_from_the_first_run_and_the_clamps():
    free = {"task": {"n_classes": 50, "n_labels": 5}, "train": {"seeds": [0]}}
    described = settings({
        "free": free,
        "K100": {"task": {"n_classes": 100, "n_labels": 5}, "train": {"seeds": [1]}},
        "A+B": {**free, "clamp": [{"point": "attn.pattern", "value": "previous_token", "blocks": [0], "heads": []},
                                  {"circuit": "B", "blocks": [1], "heads": [], "strength": 0.5}]},
    })
    assert described == {"free": "no clamps", "K100": "task.n_classes = 100",
                          "A+B": "attn.pattern = previous_token blocks [0]; circuit B blocks [1] s = 0.5"}


@pytest.fixture(scope="module")
def experiment_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("experiment")
    (folder / "tiny.toml").write_text(TINY)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the per-test one_thread fixture, which a module fixture precedes
    run_experiment(load_experiment(folder / "tiny.toml"), folder / "out", progress=False)
    torch.set_num_threads(threads)
    return folder / "out"


def test_compare_writes_tidy_tables_figures_and_one_page(experiment_dir):
    result = compare_experiment(experiment_dir)
    tables = experiment_dir / "tables"
    per_seed = pd.read_csv(tables / "phase_changes.csv")
    assert list(per_seed.columns[:3]) == ["configuration", "seed", "phase_change_step"]
    assert len(per_seed) == 3 * 2 and set(per_seed.configuration) == {"free", "A+B", "classes-16"}
    summary = pd.read_csv(tables / "comparison.csv")
    assert list(summary.configuration) == ["free", "A+B", "classes-16"]
    assert {"n_seeds", "n_reached", "mean_step", "ci_low", "ci_high"} <= set(summary.columns)
    induction = pd.read_csv(tables / "induction.csv")
    assert set(induction.columns) == {"configuration", "step", "seed", "block", "head", "induction_strength"}
    clamped = induction[(induction.configuration == "A+B") & (induction.block == 1)]
    np.testing.assert_allclose(clamped.induction_strength, 1.0, rtol=1e-5)  # B holds the induction pattern
    curves = pd.read_csv(tables / "curves.csv")
    assert set(curves.columns) == {"configuration", "step", "seed", "loss", "accuracy"}
    data = json.loads((experiment_dir / "comparison.json").read_text())
    assert data["interval"].startswith("95% Student t") and len(data["configurations"]) == 3
    for name in ("compare_loss", "compare_induction"):
        assert (experiment_dir / "figures" / f"{name}.png").is_file()
    page = result.read_text()
    assert page == (experiment_dir / "compare.html").read_text()
    assert all(name in page for name in ("free", "A+B", "classes-16", "previous_token", "n_classes"))
    assert page.count("<img") == 2


def test_compare_with_geometry_shows_each_configuration_s_geometry_over_training(experiment_dir):
    result = compare_experiment(experiment_dir, geometry=True)
    geometry = pd.read_csv(experiment_dir / "tables" / "geometry.csv")
    assert set(geometry["configuration"]) == {"free", "A+B", "classes-16"}
    assert set(geometry["measure"]) == {"separability", "variance_alignment", "mean_alignment"}
    assert set(geometry["site"]) == {"readout input"}  # the linear read-out's input, aligned to its label rows
    assert geometry["value"].notna().any()
    for name in ("separability", "variance_alignment", "mean_alignment"):
        assert (experiment_dir / "figures" / f"compare_{name}.png").is_file()
    assert "Geometry over training" in result.read_text()


def test_compare_leaves_out_configurations_not_started(experiment_dir, tmp_path):
    partial = tmp_path / "partial"
    experiment = load_experiment(experiment_dir.parent / "tiny.toml", steps=2)
    run_experiment(experiment, partial, progress=False)
    shutil.rmtree(partial / "classes-16")
    page = compare_experiment(partial).read_text()
    assert set(pd.read_csv(partial / "tables" / "phase_changes.csv").configuration) == {"free", "A+B"}
    assert "not trained yet: classes-16" in page.lower()


def test_compare_without_an_experiment_fails_in_one_line(tmp_path):
    with pytest.raises(LabError, match="no experiment"):
        compare_experiment(tmp_path)
