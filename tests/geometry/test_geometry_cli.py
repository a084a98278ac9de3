"""``icl-geometry measure`` and ``icl-geometry plot`` on a tiny store."""

import pandas as pd
import pytest

from icl_geometry.cli import build_parser, main


def test_measure_prints_a_table_and_writes_csv(tiny_store, tmp_path, capsys):
    out = tmp_path / "m.csv"
    code = main(["measure", str(tiny_store), "--group", "icl", "zero_shot", "--n-boot", "20", "--seed", "2",
                 "--rank", "3", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "== icl: accuracy" in printed and "comp" in printed and "transition:" in printed
    frame = pd.read_csv(out)
    assert set(frame["group"]) == {"icl", "zero_shot"}
    assert {"separability", "denoising_gain", "accuracy"} <= set(frame["measure"])


def test_min_rise_turns_small_rises_into_no_transition(tiny_store, tmp_path, capsys):
    assert main(["measure", str(tiny_store), "--group", "icl", "--n-boot", "0", "--min-rise", "1e9",
                 "--out", str(tmp_path / "m.csv")]) == 0
    assert "transition: layer None" in capsys.readouterr().out


def test_measure_default_csv_lands_next_to_the_store(tiny_store, tmp_path, capsys):
    assert main(["measure", str(tiny_store), "--group", "topic", "--n-boot", "0",
                 "--measures", "mean_alignment", "effective_dimension"]) == 0
    assert (tiny_store.parent / "s_measures.csv").is_file()
    assert "transition" not in capsys.readouterr().out  # needs separability and composite alignment


def test_plot_writes_figures(tiny_store, tmp_path, capsys):
    code = main(["plot", str(tiny_store), "--group", "icl", "--out", str(tmp_path / "fig"), "--layers", "1", "4",
                 "--format", "png", "--n-boot", "10"])
    assert code == 0
    names = sorted(p.name for p in (tmp_path / "fig").iterdir())
    assert names == ["effective_dimension.png", "measures.png", "projections_icl.png"]
    assert all((tmp_path / "fig" / name).stat().st_size > 0 for name in names)
    assert "measures.png" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["measure", "missing.zarr"], "no store at missing.zarr"),
    (["measure", "{store}", "--group", "nope"], "has no group 'nope'"),
    (["measure", "{store}", "--n-boot", "-1"], "n_boot must be an integer >= 0"),
    (["plot", "{store}", "--group", "icl", "--layers", "42"], "layers [42] are not in the data"),
])
def test_user_mistakes_are_one_line_errors(tiny_store, argv, message, capsys):
    code = main([arg.format(store=tiny_store) for arg in argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_help_teaches_with_examples():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    for name in ("measure", "plot"):
        text = subparsers.choices[name].format_help()
        assert "examples:" in text and f"icl-geometry {name} results/store.zarr" in text
