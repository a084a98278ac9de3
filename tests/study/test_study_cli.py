"""``icl-geometry study`` from the command line: config printing, clear errors, and the real-model quick study."""

from __future__ import annotations

import pandas as pd
import pytest

from icl_geometry.cli import main
from icl_geometry.config import StudyConfig, dump_toml


def test_print_config_prints_the_defaults(capsys):
    assert main(["study", "--print-config"]) == 0
    assert capsys.readouterr().out == dump_toml(StudyConfig())


def test_bad_config_is_a_one_line_error(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text("[data]\nshots = 8\n")
    assert main(["study", str(path), "--out", str(tmp_path / "out")]) == 2
    assert "data.shots must be a list of int" in capsys.readouterr().err


def test_help_teaches_with_examples(capsys):
    with pytest.raises(SystemExit):
        main(["study", "--help"])
    assert "icl-geometry study --quick" in capsys.readouterr().out


@pytest.mark.real_model
def test_real_model_quick_study(real_model, tmp_path, capsys):
    assert main(["study", "--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "report:" in printed and "sepa.icl" in printed
    accuracy = pd.read_csv(tmp_path / "tables/accuracy.csv").set_index("group")
    print(printed)
    assert accuracy.loc["icl", "accuracy"] > accuracy.loc["zero_shot", "accuracy"]
    assert (tmp_path / "report.html").stat().st_size > 50_000
