"""Experiment sets: TOML files of lab configurations (named clamp sets, data sweeps), trained resumably, one
batched multi-seed run per configuration."""

import json

import pytest

from training_lab.clamps import ClampSpec
from training_lab.errors import LabError
from training_lab.experiments import experiment_names, load_experiment, run_experiment
from training_lab.store import open_run

from tests.training_lab.experiment_files import TINY


@pytest.fixture
def tiny_experiment(tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    return path


def test_a_file_gives_one_lab_config_per_configuration(tiny_experiment):
    experiment = load_experiment(tiny_experiment)
    assert experiment.name == "tiny" and list(experiment.configurations) == ["free", "A+B", "classes-16"]
    free, clamped, classes = experiment.configurations.values()
    assert free.clamps == () and free.train.seeds == (0, 1) and free.task.n_classes == 8
    assert free.train.optimizer == "adam" and free.task.relabel  # the preset's keys stay
    assert clamped.clamps == (ClampSpec("attn.pattern", "previous_token", blocks=(0,)),
                              ClampSpec("attn.pattern", "induction", blocks=(1,), strength=1.0))
    assert classes.task.n_classes == 16 and classes.model == free.model


def test_quick_steps_and_seeds_change_every_configuration(tiny_experiment):
    experiment = load_experiment(tiny_experiment, quick=True, steps=4)
    assert all(c.train.seeds == (0,) and c.train.steps == 4 for c in experiment.configurations.values())
    assert all(c.train.seeds == (5, 6) for c in load_experiment(tiny_experiment, seeds=[5, 6]).configurations.values())


@pytest.mark.parametrize("name", experiment_names())
def test_shipped_experiments_load_at_both_scales(name):
    for quick in (False, True):
        experiment = load_experiment(name, quick=quick)
        assert len(experiment.configurations) >= 3
        assert all(len(c.train.seeds) >= 2 for c in experiment.configurations.values())


def test_the_shipped_sets_hold_the_papers_runs():
    clamps = load_experiment("singh-clamps").configurations
    assert list(clamps) == ["free", "A", "A+B", "C", "A+C"] and clamps["free"].clamps == ()
    data = load_experiment("singh-data").configurations
    assert sorted({c.task.n_classes for c in data.values()}) == [50, 100, 200]
    assert sorted({c.task.n_labels for c in data.values()}) == [5, 10, 15]


@pytest.mark.parametrize("text, words", [
    ("[[configuration]]\nname = 'x'\ncircuits = ['Z']\n", "unknown circuit 'Z'"),
    ("[[configuration]]\nname = 'x'\n[[configuration]]\nname = 'x'\n", "twice"),
    ("[[configuration]]\nname = 'a/b'\n", "name"),
    ("[[configuration]]\nname = 'x'\ncolour = 1\n", "colour"),
    ("colour = 1\n[[configuration]]\nname = 'x'\n", "colour"),
    ("[circuits]\nA = [{ point = 'attn.nothing' }]\n[[configuration]]\nname = 'x'\ncircuits = ['A']\n",
     "attn.nothing"),
    ("[[configuration]]\nname = 'x'\ntask = { n_pairs = 99 }\n", "n_pairs"),
    ("preset = 'nope'\n[[configuration]]\nname = 'x'\n", "nope"),
    ("description = 'no configurations'\n", "configuration"),
])
def test_bad_experiment_files_fail_in_one_line_before_training(tmp_path, text, words):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(LabError, match=words) as caught:
        load_experiment(path)
    assert "\n" not in str(caught.value)


def test_an_unknown_experiment_name_lists_the_shipped_ones():
    with pytest.raises(LabError, match="singh-clamps"):
        load_experiment("no-such-experiment")


def test_runs_each_configuration_batched_into_its_own_directory_and_resumes(tiny_experiment, tmp_path):
    experiment = load_experiment(tiny_experiment)
    out = tmp_path / "exp"
    timings = run_experiment(experiment, out, progress=False)
    assert list(timings["configurations"]) == ["free", "A+B", "classes-16"] and timings["total"] > 0
    for name, config in experiment.configurations.items():
        curves = open_run(out / name)
        assert list(curves["seed"].values) == [0, 1] and curves["done"].values.all()
        assert curves.attrs["config"] == config.to_dict()
    assert json.loads((out / "experiment.json").read_text())["configurations"] == ["free", "A+B", "classes-16"]
    before = (out / "free" / "checkpoints").iterdir().__next__().stat().st_mtime_ns
    run_experiment(experiment, out, progress=False)  # finished: nothing retrained
    assert (out / "free" / "checkpoints").iterdir().__next__().stat().st_mtime_ns == before


def test_another_experiment_in_the_same_directory_is_refused(tiny_experiment, tmp_path):
    out = tmp_path / "exp"
    run_experiment(load_experiment(tiny_experiment, steps=2), out, progress=False)
    with pytest.raises(LabError, match="another experiment"):
        run_experiment(load_experiment("singh-data"), out, progress=False)
