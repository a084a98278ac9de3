"""``icl-geometry train``, in-process: TOML config over a preset, resume, analysis, one-line errors."""

from dataclasses import replace

import pandas as pd
import pytest

from icl_geometry.cli import main
from icl_geometry.config import dump_toml


@pytest.fixture
def config_file(tiny, tmp_path):
    config = replace(tiny, train=replace(tiny.train, snapshot_examples=32))
    path = tmp_path / "lab.toml"
    path.write_text(dump_toml(config))
    return path


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("icl-geometry: error:")
    return err


def test_help_teaches_with_examples(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    assert "--preset quick" in text and "--analyse-only" in text and "--print-config > lab.toml" in text


def test_print_config_round_trips_through_a_toml_file(config_file, tmp_path, capsys):
    assert main(["train", str(config_file), "--seeds", "3", "4", "--print-config"]) == 0
    printed = capsys.readouterr().out
    (tmp_path / "again.toml").write_text(printed)
    assert main(["train", str(tmp_path / "again.toml"), "--print-config"]) == 0
    assert capsys.readouterr().out == printed and "seeds = [3, 4]" in printed


def test_train_then_resume_then_analyse_only(config_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", str(config_file), "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "Seed 0:" in printed and (out / "report.html").is_file() and (out / "tables" / "phases.csv").is_file()
    assert main(["train", str(config_file), "--out", str(out), "--no-progress"]) == 0  # finished: nothing redone
    (out / "report.html").unlink()
    assert main(["train", "--out", str(out), "--analyse-only", "--no-progress", "--smooth", "3"]) == 0
    assert (out / "report.html").is_file()


def test_the_phase_rule_window_and_threshold_are_options(config_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", str(config_file), "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    # A threshold no rise can pass: one phase, no transition.
    assert main(["train", "--out", str(out), "--analyse-only", "--no-progress", "--phase-window", "20",
                 "--phase-threshold", "2"]) == 0
    curves = pd.read_csv(out / "tables" / "curves.csv")
    assert not curves["boundary"].any() and set(curves["phase"]) == {0}
    assert main(["train", "--out", str(out), "--analyse-only", "--phase-window", "0"]) == 2
    assert "window" in error_line(capsys)
    assert main(["train", "--out", str(out), "--analyse-only", "--circuit-rise", "0"]) == 2
    assert "rise" in error_line(capsys)


def test_the_phase_metrics_that_name_the_circuits_are_a_table(config_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", str(config_file), "--out", str(out), "--no-progress", "--circuit-rise", "0.05"]) == 0
    means = pd.read_csv(out / "tables" / "phase_metrics.csv")
    named = pd.read_csv(out / "tables" / "phases.csv").query("n_steps > 0")
    assert list(means.columns) == ["seed", "phase", "block", "bigram", "label_attention", "chunk_example"]
    assert set(zip(means.seed, means.phase)) == set(zip(named.seed, named.phase))
    assert means.groupby(["seed", "phase"]).size().eq(2).all()  # both blocks


@pytest.mark.parametrize("text, names", [
    ("[train]\nsteps = 10\nlearning_rate = 0.1\n", "learning_rate"),
    ("[optimiser]\nlr = 0.1\n", "optimiser"),
    ("[task]\nn_pairs = 9\nn_classes = 8\n", "n_pairs"),
    ("[train]\nsteps = 'many'\n", "wrong type"),
    ("[train\n", "not valid TOML"),
])
def test_bad_config_files_fail_with_one_line_and_exit_2(tmp_path, capsys, text, names):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    assert main(["train", str(path), "--preset", "quick", "--out", str(tmp_path / "run")]) == 2
    assert names in error_line(capsys)


def test_another_config_for_an_existing_run_is_refused(config_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", str(config_file), "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["train", str(config_file), "--out", str(out), "--steps", "20", "--no-progress"]) == 2
    assert "train.steps" in error_line(capsys)
    assert main(["train", str(config_file), "--out", str(out), "--seeds", "1", "--no-progress"]) == 2
    assert "train.seeds" in error_line(capsys)


def test_more_steps_extend_an_existing_run_and_its_analysis(config_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", str(config_file), "--out", str(out), "--no-progress"]) == 0
    (out / "report.html").unlink()
    assert main(["train", str(config_file), "--out", str(out), "--steps", "45", "--no-progress"]) == 0
    curves = pd.read_csv(out / "tables" / "curves.csv")
    assert curves["step"].max() == 45 and 30 in set(curves["step"]) and (out / "report.html").is_file()


def test_analyse_only_without_a_run_fails_with_one_line(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "none"), "--analyse-only"]) == 2
    assert "no lab run store" in error_line(capsys)

