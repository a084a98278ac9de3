import json

import xarray as xr

from icl_geometry.cli import main


def test_extract_command_writes_a_group(tiny_gemma_dir, tmp_path, capsys):
    store = tmp_path / "s.zarr"
    code = main(["extract", "--model", str(tiny_gemma_dir), "--task", "topic", "--shots", "2", "--n", "6",
                 "--out", str(store), "--setting", "two_shot", "--separator", "\\n\\n"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["group"] == "two_shot" and 0 <= printed["accuracy"] <= 1
    ds = xr.open_zarr(store, group="two_shot", consolidated=False)
    assert "\n\n" in str(ds["prompt"].values[0])


def test_user_mistakes_are_one_line_errors(tiny_gemma_dir, tmp_path, capsys):
    code = main(["extract", "--model", str(tiny_gemma_dir), "--task", "nope", "--out", str(tmp_path / "s.zarr")])
    assert code == 2
    err = capsys.readouterr().err
    assert "unknown task 'nope'" in err and "Traceback" not in err


def test_extract_command_chooses_the_example_chunk(tiny_gemma_dir, tmp_path):
    store = tmp_path / "s.zarr"
    assert main(["extract", "--model", str(tiny_gemma_dir), "--task", "topic", "--shots", "2", "--n", "6",
                 "--example-chunk", "3", "--out", str(store)]) == 0
    ds = xr.open_zarr(store, group="icl", consolidated=False)
    assert ds.attrs["example_chunk"] == 3 and ds["hidden"].encoding["chunks"][0] == 3


def test_extract_command_names_an_unreachable_scheduler(tiny_gemma_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("extraction.distributed.CONNECT_TIMEOUT", 1)
    code = main(["extract", "--model", str(tiny_gemma_dir), "--task", "topic", "--shots", "2", "--n", "6",
                 "--scheduler", "tcp://127.0.0.1:9", "--out", str(tmp_path / "s.zarr")])
    assert code == 2
    err = capsys.readouterr().err
    assert "cannot reach a Dask scheduler at tcp://127.0.0.1:9" in err and "Traceback" not in err
    assert not (tmp_path / "s.zarr").exists()
