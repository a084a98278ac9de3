from dataclasses import replace

import numpy as np
import pytest
import torch
import xarray as xr
from safetensors.torch import load_file

from training_lab.config import LabConfig
from training_lab.errors import LabError
from training_lab.store import open_run
from training_lab.train import Trainer, train
from tests.training_lab.runs import train_interrupted


def _adam(config, steps=20):
    return replace(config, train=replace(config.train, optimizer="adam", lr=1e-3, steps=steps))


def test_adam_is_an_option_and_resumes_bit_for_bit(tiny, tmp_path):
    config = _adam(tiny)
    assert isinstance(Trainer(config, tmp_path / "probe").optimizer, torch.optim.Adam)
    assert LabConfig.from_dict(config.to_dict()) == config
    train(config, tmp_path / "whole", progress=False)
    train_interrupted(config, tmp_path / "resumed", step=13)
    train(config, tmp_path / "resumed", progress=False)
    xr.testing.assert_identical(open_run(tmp_path / "whole").load(), open_run(tmp_path / "resumed").load())
    whole, resumed = (load_file(str(next((tmp_path / d / "checkpoints").glob("*.safetensors"))))
                      for d in ("whole", "resumed"))
    assert all(torch.equal(whole[k], resumed[k]) for k in whole) and any(k.startswith("optimizer.") for k in whole)


def test_adam_on_batched_seeds_equals_separate_runs(tiny, tmp_path):
    config = _adam(tiny, 10)
    batched = train(config.with_seeds((0, 1)), tmp_path / "batched", progress=False).load()
    for index, seed in enumerate((0, 1)):
        alone = train(config.with_seeds((seed,)), tmp_path / f"seed{seed}", progress=False).load()
        np.testing.assert_allclose(batched["loss"].isel(seed=index), alone["loss"].isel(seed=0), rtol=1e-5, atol=1e-6)


def test_an_unknown_optimizer_fails_in_one_line(tiny):
    with pytest.raises(LabError, match="train.optimizer must be one of sgd, adam, got 'rmsprop'"):
        replace(tiny.train, optimizer="rmsprop")


def test_every_optimizer_the_config_accepts_is_the_one_the_trainer_builds(tiny, tmp_path):
    from training_lab.config import OPTIMIZERS

    for name, kind in OPTIMIZERS.items():
        config = replace(tiny, train=replace(tiny.train, optimizer=name))
        assert type(Trainer(config, tmp_path / name).optimizer) is kind
