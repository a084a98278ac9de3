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


def _word_pairs(folder) -> str:
    """A user pair file in words the tiny word-level tokenizer knows (input, output, split columns)."""
    from tests.extraction.test_pair_eval import word_task

    task = word_task()
    path = folder / "pairs.csv"
    path.write_text("input,output,split\n" + "".join(f"{x},{y},{'train' if i in task.train else 'test'}\n"
                                                      for i, (x, y) in enumerate(zip(task.inputs, task.outputs))))
    return str(path)


def test_scan_of_a_pair_file_with_generated_cells(tiny_gemma_dir, tmp_path, capsys):
    out = tmp_path / "flow"
    code = main(["flow", "scan", "--model", str(tiny_gemma_dir), "--data", _word_pairs(tmp_path), "--template",
                 "{input} : {output}", *SMALL, "--width", "3", "--edges", "y->y,y->final", "--generate",
                 "y->final@1", "--n-boot", "20", "--quiet", "--out", str(out)])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"clean_accuracy", "clean_exact_accuracy"} <= set(summary)
    table = pd.read_csv(out / "flow.csv")
    exact = table[table["quantity"] == "exact"]
    assert exact[["edge", "window"]].values.tolist() == [["y->final", 1]]
    assert {"accuracy_change", "logit_change"} <= set(table["quantity"]) and (out / "flow_heatmap.png").exists()


@pytest.mark.parametrize("generate, words", [("y->final", "EDGE@FIRST_BLOCK"), ("y->final@3", "starting at block 3")])
def test_bad_generated_cells_are_one_line_and_exit_2(tiny_gemma_dir, tmp_path, capsys, generate, words):
    code = main(["flow", "scan", "--model", str(tiny_gemma_dir), "--data", _word_pairs(tmp_path), "--template",
                 "{input} : {output}", *SMALL, "--width", "3", "--generate", generate, "--n-boot", "0", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and words in err and len(err.splitlines()) == 1


@pytest.mark.real_model
def test_small_pair_scan_through_the_cli_on_the_real_model(tmp_path, capsys):
    """Gemma 3 270M, ambiguous past tense / copying: 4 four-shot prompts, 2 edge types over 2 windows (width L - 1),
    whole answers generated for one cell; checks the pieces run and hang together, not the science."""
    from transformers import AutoConfig

    from extraction.models import resolve_spec

    width = AutoConfig.from_pretrained(resolve_spec(None)[0]).get_text_config().num_hidden_layers - 1
    out = tmp_path / "flow"
    code = main(["flow", "scan", "--task", "ambiguous_past_copying", "--shots", "4", "--n", "4", "--width",
                 str(width), "--edges", "y->x,y->final", "--generate", "y->final@1", "--dtype", "bfloat16",
                 "--n-boot", "100", "--quiet", "--out", str(out)])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    table = pd.read_csv(out / "flow.csv")
    assert set(table["edge"]) == {"y->x", "y->final"} and set(table["window"]) == {0, 1}
    readings = table[table["quantity"].isin(["reading_past_tense", "reading_copying"])]
    assert len(readings) == 8 and readings["value"].between(0, 1).all()
    assert 0 <= summary["clean_exact_accuracy"] <= 1 and 0 <= summary["clean_reading_copying"] <= 1
    assert len(table[table["quantity"] == "exact"]) == 1


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
