"""``icl-geometry flow`` (issue 10, item 7): the edge scan's table, Dataset and heat map, the knockout's measure
changes, and one-line errors for bad input; in-process on the tiny Gemma."""

from __future__ import annotations

import json
import warnings

import pandas as pd
import pytest
import xarray as xr

from icl_geometry.cli import main

SMALL = ["--shots", "2", "--n", "4", "--batch-size", "4"]


def test_scan_writes_table_dataset_and_heat_map(tiny_gemma_dir, tmp_path, capsys):
    out = tmp_path / "flow"
    code = main(["flow", "scan", "--model", str(tiny_gemma_dir), *SMALL, "--width", "2", "--edges",
                 "y->x,y->final", "--n-boot", "20", "--out", str(out)])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    table = pd.read_csv(out / "flow.csv")
    assert set(table["edge"]) == {"y->x", "y->final"}
    assert {"accuracy_change", "logit_change"} <= set(table["quantity"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = xr.open_zarr(out / "flow.zarr")
    assert list(ds["edge"].values) == ["y->x", "y->final"]
    assert (out / "flow_heatmap.png").exists()
    assert summary["clean_accuracy"] == pytest.approx(ds.attrs["clean_accuracy"])


def test_knockout_writes_measure_changes(tiny_gemma_dir, tmp_path, capsys):
    store, out = tmp_path / "s.zarr", tmp_path / "changes.csv"
    code = main(["flow", "knockout", str(store), "--model", str(tiny_gemma_dir), "--shots", "2", "--n", "8",
                 "--sampling", "balanced", "--edge", "y->final", "--window", "0", "--width", "1",
                 "--n-boot", "0", "--out", str(out)])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["group"] == "knockout_y-final_0-0" and summary["baseline"] == "icl"
    changes = pd.read_csv(out)
    assert {"layer", "measure", "value", "baseline_value", "change"} <= set(changes.columns)
    assert (changes["group"] == summary["group"]).all()


def test_scan_and_patch_with_a_donor(tiny_gemma_dir, tmp_path, capsys):
    """``flow scan --patch`` labels its table with the mode and donor; ``flow patch`` writes a recorded patch group
    and every measure's change against the clean group (the geometry tie of issue 10, item 6, for patching)."""
    out = tmp_path / "flow"
    assert main(["flow", "scan", "--model", str(tiny_gemma_dir), *SMALL, "--width", "2", "--edges", "y->final",
                 "--patch", "demos:1", "--n-boot", "20", "--quiet", "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["mode"] == "patch" and summary["donor"] == "demos:1"
    table = pd.read_csv(out / "flow.csv", keep_default_na=False)
    assert set(table["mode"]) == {"patch"} and set(table["donor"]) == {"demos:1"}
    store, changes = tmp_path / "s.zarr", tmp_path / "changes.csv"
    assert main(["flow", "patch", str(store), "--model", str(tiny_gemma_dir), "--shots", "2", "--n", "8",
                 "--sampling", "balanced", "--edge", "y->final", "--window", "1", "--width", "2", "--heads", "0,2",
                 "--n-boot", "0", "--quiet", "--out", str(changes)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["group"] == "patch_y-final_1-2_shuffled-0"
    (record,) = xr.open_zarr(store, group=summary["group"]).attrs["intervention"]
    assert (record["kind"], record["donor"], record["heads"]) == ("edge_patch", "shuffled:0", [0, 2])
    frame = pd.read_csv(changes)
    assert (frame["group"] == summary["group"]).all() and frame["change"].abs().max() > 0


@pytest.mark.parametrize("argv, words", [
    (["scan", "--edges", "y->nowhere"], "unknown edge type"),
    (["scan", "--width", "99"], "does not fit"),
    (["knockout", "STORE", "--edge", "y->final", "--window", "40"], "outside the model"),
    (["knockout", "STORE", "--edge", "y->x", "--shots", "1"], "connects no positions"),
    (["scan", "--patch", "elsewhere"], "unknown donor 'elsewhere'"),
    (["patch", "STORE", "--edge", "x->final", "--donor", "demos:1"], "cannot be aligned"),
    (["patch", "STORE", "--edge", "y->final", "--donor", "task:nothing"], "unknown task 'nothing'"),
])
def test_bad_input_is_one_line_and_exit_2(tiny_gemma_dir, tmp_path, capsys, argv, words):
    argv = [str(tmp_path / "s.zarr") if a == "STORE" else a for a in argv]
    code = main(["flow", *argv, "--model", str(tiny_gemma_dir), "--n", "2", "--n-boot", "0", "--quiet",
                 *(["--shots", "2"] if "--shots" not in argv else [])])
    err = capsys.readouterr().err.strip()
    assert code == 2 and words in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("step", ["scan", "knockout", "patch"])
def test_help_teaches_with_examples(step, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["flow", step, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "examples:" in text and f"icl-geometry flow {step}" in text and "--width" in text


def test_flow_without_a_step_names_the_edge_types(capsys):
    assert main(["flow"]) == 2
    text = capsys.readouterr().out
    assert "scan" in text and "knockout" in text and "y->final" in text
