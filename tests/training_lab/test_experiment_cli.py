"""``icl-geometry train --experiment``, in-process: train a set resumably, compare it, teach with --help."""

import pandas as pd
import pytest

from icl_geometry.cli import main

from tests.training_lab.experiment_files import TINY


def test_help_teaches_experiments(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    assert "--experiment singh-clamps --quick" in text and "singh-data" in text


def test_an_experiment_trains_compares_and_resumes(tmp_path, capsys):
    (tmp_path / "tiny.toml").write_text(TINY)
    out = tmp_path / "exp"
    args = ["train", "--experiment", str(tmp_path / "tiny.toml"), "--quick", "--steps", "4", "--out", str(out),
            "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "A+B" in printed and "compare.html" in printed and "seconds" in printed
    assert set(pd.read_csv(out / "tables" / "phase_changes.csv").seed) == {0}  # [quick] seeds
    (out / "compare.html").unlink()
    assert main(args[:-1] + ["--analyse-only", "--no-progress"]) == 0
    assert (out / "compare.html").is_file() and not (out / "tables" / "geometry.csv").exists()
    assert main(args[:-1] + ["--analyse-only", "--geometry", "--no-progress"]) == 0
    assert (out / "tables" / "geometry.csv").is_file()


def test_print_config_prints_every_configuration(capsys):
    assert main(["train", "--experiment", "singh-clamps", "--quick", "--print-config"]) == 0
    text = capsys.readouterr().out
    assert text.count("# configuration") == 5 and "# configuration A+C" in text and "[[clamp]]" in text


@pytest.mark.parametrize("args, words", [
    (["--experiment", "nope"], "singh-clamps"),
    (["--quick", "--preset", "quick"], "--experiment"),
    (["lab.toml", "--experiment", "singh-data"], "either"),
])
def test_bad_experiment_commands_fail_in_one_line(tmp_path, capsys, args, words):
    assert main(["train", *args, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err
