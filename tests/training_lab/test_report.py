"""training_lab.analyse, the one-call analysis of a run: tables, figures and the report from the store's completed steps."""

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from training_lab.circuits import circuit_metrics
from training_lab.report import analyse
from training_lab.store import open_run
from training_lab.train import train
from tests.training_lab.runs import train_interrupted


@pytest.fixture
def run(tiny, tmp_path):
    config = replace(tiny, train=replace(tiny.train, snapshot_examples=32, seeds=(0, 1)))
    train(config, tmp_path / "run", progress=False)
    return tmp_path / "run"


def test_analyse_writes_tidy_tables_figures_and_a_self_contained_report(run):
    result = analyse(run, n_boot=0)
    tables = {name: pd.read_csv(run / "tables" / f"{name}.csv") for name in ("curves", "circuits", "phases",
                                                                             "geometry")}
    assert list(tables["curves"].columns) == ["step", "seed", "loss", "accuracy", "train_loss", "phase",
                                              "in_transition", "boundary"]
    assert len(tables["curves"]) == result.curves.sizes["step"] * 2
    assert list(tables["circuits"].columns) == ["step", "seed", "block", "bigram", "label_attention",
                                                "chunk_example"]
    assert set(tables["phases"].columns) >= {"seed", "phase", "start", "circuit", "accuracy"}
    assert set(tables["geometry"]["site"]) >= {"embedding", "readout hidden"}
    for name in ("training_curves", "circuit_metrics", "attention_maps", "measures_over_training"):
        assert (run / "figures" / f"{name}.png").is_file()
    page = result.report.read_text()
    assert page.count("data:image/png;base64") == 4 and "<h2>Phases</h2>" in page and "Seed 1:" in page


def test_analyse_reads_only_completed_steps(tiny, tmp_path):
    train_interrupted(tiny, tmp_path / "run", step=12)
    result = analyse(tmp_path / "run", geometry=False)
    done = open_run(tmp_path / "run")["done"].values
    assert 0 < result.curves.sizes["step"] == done.sum() < len(done)
    assert not (tmp_path / "run" / "tables" / "geometry.csv").exists()
    assert (tmp_path / "run" / "report.html").is_file()


def test_analyse_runs_with_several_heads_per_block_on_the_heads_mean_pattern(tiny, tmp_path):
    config = replace(tiny, model=replace(tiny.model, n_heads=2), train=replace(tiny.train, snapshot_examples=16))
    train(config, tmp_path / "run", progress=False)
    result = analyse(tmp_path / "run", geometry=False)
    per_head = circuit_metrics(open_run(tmp_path / "run")["mean_pattern"].sel(step=result.curves["step"]))
    assert per_head.sizes["head"] == 2
    assert np.allclose(result.metrics["label_attention"], per_head["label_attention"].mean("head"))
    assert "mean over the 2 heads" in result.report.read_text()
