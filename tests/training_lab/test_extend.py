"""Extending a lab run: re-running with a larger ``train.steps`` grows the store and continues training."""

import logging
from dataclasses import replace

import numpy as np
import pytest
import torch
import xarray as xr
from safetensors.torch import load_file

from training_lab.config import TrainConfig
from training_lab.errors import LabError
from training_lab.store import open_run
from training_lab.train import schedule, train
from tests.training_lab.runs import train_interrupted


def _steps(config, steps):
    return replace(config, train=replace(config.train, steps=steps))


def _final_weights(out):
    return load_file(str(sorted((out / "checkpoints").glob("*.safetensors"))[-1]))


def _assert_same_at_common_steps(grown, direct, *, skip=()):
    """``grown`` equals ``direct`` at every step of ``direct`` (except the variables and steps in ``skip``)."""
    for group in ("curves", "snapshots"):
        a, b = open_run(grown, group).load(), open_run(direct, group).load()
        assert set(b["step"].values) <= set(a["step"].values)
        a = a.sel(step=b["step"].values)
        for name, step in skip:
            if name in a and step in b["step"].values:
                a[name].loc[{"step": step}] = b[name].sel(step=step)
        xr.testing.assert_identical(a, b)
    whole, extended = _final_weights(direct), _final_weights(grown)
    assert whole.keys() == extended.keys() and all(torch.equal(whole[k], extended[k]) for k in whole)


@pytest.mark.parametrize("steps", [30, 23])
def test_an_extended_run_equals_a_run_trained_to_the_end_directly(tiny, tmp_path, caplog, steps):
    config = tiny.with_seeds((0, 1))
    train(_steps(config, steps), tmp_path / "grown", progress=False)
    with caplog.at_level(logging.INFO, logger="training_lab"):
        curves = train(_steps(config, 60), tmp_path / "grown", progress=False).load()
    assert f"extending run from {steps} to 60 steps" in caplog.text
    assert curves.attrs["config"]["train"]["steps"] == 60 and bool(curves["done"].all())
    train(_steps(config, 60), tmp_path / "direct", progress=False)
    direct = open_run(tmp_path / "direct").load()
    # the old last step stays as an extra evaluation and snapshot point, done
    grown_snaps = open_run(tmp_path / "grown", "snapshots").load()
    assert steps in curves["step"].values and steps in grown_snaps["step"].values and bool(grown_snaps["done"].all())
    assert set(curves["step"].values) == set(direct["step"].values) | {steps}
    # train_loss after an extra evaluation step averages the updates since it, so it differs there only
    after = int(direct["step"].values[np.searchsorted(direct["step"].values, steps)])
    skip = [] if steps in direct["step"].values else [("train_loss", after)]
    _assert_same_at_common_steps(tmp_path / "grown", tmp_path / "direct", skip=skip)


def test_an_extension_killed_midway_resumes_to_the_same_run(tiny, tmp_path):
    config = tiny.with_seeds((0, 1))
    for out in ("killed_early", "killed_late", "whole"):
        train(_steps(config, 30), tmp_path / out, progress=False)
    train_interrupted(_steps(config, 60), tmp_path / "killed_early", step=37)  # latest checkpoint: the old end, 30
    train_interrupted(_steps(config, 60), tmp_path / "killed_late", step=47)  # latest checkpoint: 40
    for out in ("killed_early", "killed_late", "whole"):
        train(_steps(config, 60), tmp_path / out, progress=False)
    for out in ("killed_early", "killed_late"):
        for group in ("curves", "snapshots"):
            xr.testing.assert_identical(open_run(tmp_path / "whole", group).load(),
                                        open_run(tmp_path / out, group).load())
        whole, resumed = _final_weights(tmp_path / "whole"), _final_weights(tmp_path / out)
        assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_fewer_steps_or_another_setting_is_still_refused_in_one_line(tiny, tmp_path):
    train(_steps(tiny, 10), tmp_path / "run", progress=False)
    for changed, names in ((_steps(tiny, 5), "train.steps"),
                           (replace(tiny, train=replace(tiny.train, steps=20, lr=0.1)), "train.lr, train.steps")):
        with pytest.raises(LabError, match=rf"another config \(differs in {names}\).*only train.steps can grow") \
                as error:
            train(changed, tmp_path / "run", progress=False)
        assert "\n" not in str(error.value)
    assert open_run(tmp_path / "run").attrs["config"]["train"]["steps"] == 10


@pytest.mark.parametrize("per_decade", [1, 2, 3, 5, 10])
def test_a_longer_schedule_starts_with_the_shorter_one(per_decade):
    """The growth relies on it: below the old last step, the new schedule's steps are the old ones."""
    base = TrainConfig(eval_every=7, evals_per_decade=per_decade, snapshots_per_decade=per_decade + 1)
    for old in (1, 2, 9, 10, 23, 99, 100, 101, 1000, 4321):
        short = schedule(replace(base, steps=old))
        for new in (old + 1, 2 * old + 3, 10 * old, 100_000):
            long = schedule(replace(base, steps=new))
            assert [s for s in long.evals if s < old] == short.evals[:-1]
            assert [s for s in long.snapshots if s < old] == short.snapshots[:-1]



def test_an_extension_killed_while_growing_the_store_is_redone(tiny, tmp_path, monkeypatch):
    from training_lab import store

    grow = store._grow

    def killed(path, last, datasets):
        grow(path, last, {name: datasets[name] for name in list(datasets)[:1]})  # the first group only
        raise KeyboardInterrupt

    for out in ("killed", "whole"):
        train(_steps(tiny, 23), tmp_path / out, progress=False)
    with monkeypatch.context() as patch:
        patch.setattr(store, "_grow", killed)
        with pytest.raises(KeyboardInterrupt):
            train(_steps(tiny, 60), tmp_path / "killed", progress=False)
    assert open_run(tmp_path / "killed").attrs["config"]["train"]["steps"] == 23
    for out in ("killed", "whole"):
        train(_steps(tiny, 60), tmp_path / out, progress=False)
    for group in ("curves", "snapshots"):
        xr.testing.assert_identical(open_run(tmp_path / "whole", group).load(),
                                    open_run(tmp_path / "killed", group).load())
