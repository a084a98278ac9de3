"""Statistics groups through the table and the CLIs: extract --keep statistics, geometry measure --engine."""

import numpy as np
import pandas as pd
import xarray as xr

from geometry import measure, table
from icl_geometry.cli import main


def test_extract_cli_keeps_low_rank_statistics(tiny_gemma_dir, tmp_path):
    store = tmp_path / "s.zarr"
    code = main(["extract", "--model", str(tiny_gemma_dir), "--task", "topic", "--shots", "2", "--n", "8",
                 "--out", str(store), "--keep", "statistics", "--statistics-blocks", "2", "--statistics-rank", "3"])
    assert code == 0
    ds = xr.open_zarr(store, group="icl", consolidated=False)
    assert "hidden" not in ds and ds.sizes["resample_block"] == 2 and ds.sizes["rank"] == 3


def test_extract_cli_refuses_a_bad_rank_in_one_line(tiny_gemma_dir, tmp_path, capsys):
    code = main(["extract", "--model", str(tiny_gemma_dir), "--task", "topic", "--n", "4", "--out",
                 str(tmp_path / "s.zarr"), "--keep", "statistics", "--statistics-rank", "0"])
    assert code == 2
    err = capsys.readouterr().err
    assert "statistics_rank must be an integer >= 1" in err and "Traceback" not in err


def test_a_statistics_group_is_measured_by_the_table_and_the_cli(tiny_gemma, tiny_store, tmp_path, capsys):
    from extraction.extractor import extract

    store = tmp_path / "s.zarr"
    extract(tiny_gemma, store, task="topic", shots=2, n=24, setting="topic", keep="statistics", statistics_blocks=4,
            progress=False)
    frame = table(store, n_boot=0, progress=False)  # every group, statistics included; engine chosen per group
    assert set(frame["group"]) == {"topic"}
    assert frame.query("measure == 'effective_dimension' and layer > 0")["value"].notna().all()  # layer 0: NaN
    assert measure(store, "topic", n_boot=0, progress=False).attrs["engine"] == "statistics"
    out = tmp_path / "m.csv"
    assert main(["measure", str(store), "--n-boot", "0", "--out", str(out)]) == 0
    assert "== topic" in capsys.readouterr().out and set(pd.read_csv(out)["group"]) == {"topic"}
    # a group of states measured by the statistics engine from the CLI
    assert main(["measure", str(tiny_store), "--group", "topic", "--n-boot", "0", "--engine", "statistics",
                 "--measures", "effective_dimension", "--out", str(out)]) == 0
    in_memory = measure(tiny_store, "topic", measures=["effective_dimension"], n_boot=0, progress=False)
    got = pd.read_csv(out).dropna(subset=["layer"])["value"].to_numpy()
    np.testing.assert_allclose(got, in_memory["value"].values[:, 0], rtol=1e-6)
