from dataclasses import replace

import numpy as np
import pytest
import torch
import xarray as xr
from safetensors.torch import load_file

from training_lab.errors import LabError, NonFiniteLossError
from training_lab.store import open_run
from training_lab.train import Trainer, schedule, train
from tests.training_lab.runs import train_interrupted


def _curves(out):
    return open_run(out).load()


def test_run_store_holds_curves_snapshots_and_the_config(tiny, tmp_path):
    curves = train(tiny, tmp_path / "run", progress=False)
    assert curves.attrs["config"] == tiny.to_dict() and "torch" in curves.attrs["provenance"]
    assert list(curves["step"].values) == schedule(tiny.train).evals and bool(curves["done"].all())
    assert curves["loss"].dims == ("step", "seed") and np.isfinite(curves["loss"].values).all()
    assert np.isnan(curves["train_loss"].values[0]).all() and np.isfinite(curves["train_loss"].values[1:]).all()
    snaps = open_run(tmp_path / "run", "snapshots").load()
    assert snaps["pattern"].dims == ("step", "seed", "block", "head", "example", "query", "key")
    assert snaps["hidden"].dims == ("step", "seed", "layer", "example", "dim")
    assert snaps.sizes["layer"] == tiny.model.n_blocks + 1 and bool(snaps["done"].all())
    assert snaps["readout_rows"].dims == ("step", "seed", "class", "unit")
    assert snaps["label"].dims == ("seed", "example")
    np.testing.assert_allclose(snaps["pattern"].sum("key"), 1.0, rtol=1e-5)
    weights = load_file(str(next((tmp_path / "run" / "checkpoints").glob("*.safetensors"))))
    np.testing.assert_array_equal(weights["readout.W_2"].transpose(1, 2).numpy(), snaps["readout_rows"][-1].values)


def test_snapshots_hold_the_readout_hidden_layer_of_the_final_query_state(tiny, tmp_path):
    train(tiny, tmp_path / "run", progress=False)
    snaps = open_run(tmp_path / "run", "snapshots").load()
    assert snaps["readout_hidden"].dims == ("step", "seed", "example", "unit")
    weights = load_file(str(next((tmp_path / "run" / "checkpoints").glob("*.safetensors"))))
    final = snaps["hidden"].isel(step=-1, layer=-1).values  # (seed, example, dim)
    expected = np.maximum(np.einsum("sed,sdu->seu", final, weights["readout.W_1"].numpy())
                          + weights["readout.b_1"].numpy()[:, None], 0)
    np.testing.assert_allclose(snaps["readout_hidden"].isel(step=-1).values, expected, rtol=1e-5, atol=1e-6)


def test_batched_seeds_equal_separate_runs(tiny, tmp_path):
    batched = train(tiny.with_seeds((0, 1, 2)), tmp_path / "batched", progress=False).load()
    for index, seed in enumerate((0, 1, 2)):
        alone = train(tiny.with_seeds((seed,)), tmp_path / f"seed{seed}", progress=False).load()
        for name in ("loss", "accuracy", "train_loss"):
            np.testing.assert_allclose(batched[name].isel(seed=index), alone[name].isel(seed=0), rtol=1e-5,
                                       atol=1e-6, err_msg=f"{name} of seed {seed}")


def test_a_killed_run_resumes_to_the_uninterrupted_result_bit_for_bit(tiny, tmp_path):
    config = tiny.with_seeds((0, 1))
    train(config, tmp_path / "whole", progress=False)
    train_interrupted(config, tmp_path / "resumed", step=23)
    assert not bool(_curves(tmp_path / "resumed")["done"].all())
    train(config, tmp_path / "resumed", progress=False)
    for group in ("curves", "snapshots"):
        xr.testing.assert_identical(open_run(tmp_path / "whole", group).load(),
                                    open_run(tmp_path / "resumed", group).load())
    whole, resumed = (load_file(str(next((tmp_path / d / "checkpoints").glob("*.safetensors"))))
                      for d in ("whole", "resumed"))
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_resuming_with_another_config_fails_with_one_line(tiny, tmp_path):
    train(replace(tiny, train=replace(tiny.train, steps=5)), tmp_path / "run", progress=False)
    with pytest.raises(LabError, match=r"another config \(differs in train.lr\)") as error:
        train(replace(tiny, train=replace(tiny.train, steps=5, lr=0.1)), tmp_path / "run", progress=False)
    assert "\n" not in str(error.value)


def test_non_finite_loss_stops_the_run_naming_the_step_and_the_last_checkpoint(tiny, tmp_path):
    trainer = Trainer(tiny, tmp_path / "run")

    def poison(step):
        if step == 12:
            with torch.no_grad():
                trainer.model.weight("readout.b_2").fill_(float("nan"))

    with pytest.raises(NonFiniteLossError, match=r"non-finite training loss at step 12 \(seed\(s\) \[0\]\); last "
                       r"good checkpoint: .*step_00000010.safetensors") as error:
        trainer.run(progress=False, on_step=poison)
    assert error.value.step == 12 and error.value.checkpoint.endswith("step_00000010.safetensors")
    assert "\n" not in str(error.value)


def test_huge_learning_rate_is_caught_at_once(tiny, tmp_path):
    with pytest.raises(NonFiniteLossError, match="lower train.lr"):
        train(replace(tiny, train=replace(tiny.train, lr=1e12)), tmp_path / "run", progress=False)


def test_open_run_names_a_missing_store_and_the_valid_groups(tiny, tmp_path):
    with pytest.raises(LabError, match="no lab run store at"):
        open_run(tmp_path / "nothing")
    train(replace(tiny, train=replace(tiny.train, steps=2)), tmp_path / "run", progress=False)
    with pytest.raises(LabError, match="valid groups: curves, snapshots"):
        open_run(tmp_path / "run", "weights")


def test_a_clamp_on_the_last_block_holds_at_every_training_step(tiny, tmp_path):
    trainer = Trainer(tiny, tmp_path / "run")
    seq = tiny.task.seq_len
    uniform = torch.tril(torch.ones(seq, seq)) / torch.arange(1, seq + 1)[:, None]
    seen = []
    with trainer.model.hooks.clamp("blocks.1.attn.pattern", uniform), \
            trainer.model.hooks.add({"blocks.1.attn.pattern": lambda value, point: seen.append(value.detach())}):
        trainer.run(progress=False)
    assert len(seen) > tiny.train.steps
    assert all(torch.equal(value, uniform.expand_as(value)) for value in seen)
    snaps = open_run(tmp_path / "run", "snapshots").load()
    stored = snaps["pattern"].sel(block=1).values
    np.testing.assert_array_equal(stored, np.broadcast_to(uniform.numpy(), stored.shape))
