"""[S]'s held-out evaluation: fixed exemplars per class, held-out exemplars and held-out classes, recorded per
evaluation set with a phase-change time each."""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import xarray as xr

from training_lab.config import TaskConfig, preset
from training_lab.errors import LabError
from training_lab.induction import phase_change_steps
from training_lab.tasks import make_world, sample
from training_lab.train import Trainer, train

HELDOUT = dict(n_tasks=1, n_classes=6, n_labels=4, n_pairs=2, item_dims=40, position_dims=5, epsilon=0.05,
               query_in_context=True, relabel=True, n_exemplars=1, heldout_exemplars=3, heldout_classes=5)


def _world(task: TaskConfig):
    return make_world(task, torch.Generator().manual_seed(0))


def _nearest_exemplar(task, world, batch) -> tuple[np.ndarray, np.ndarray]:
    """For every item: the index of its class's closest exemplar, and that distance."""
    items = batch.tokens[:, 0::2, :task.item_dims] * math.sqrt(1 + task.epsilon**2)  # (B, N+1, D)
    classes = torch.cat([batch.context_classes, batch.query_class.unsqueeze(1)], dim=1)
    distance = (items.unsqueeze(2) - world.exemplars[classes]).norm(dim=-1)  # (B, N+1, exemplars)
    return distance.argmin(-1).numpy(), distance.min(-1).values.numpy()


def test_items_are_exemplars_plus_noise_and_each_set_uses_its_own_exemplars_and_classes():
    task = TaskConfig(**HELDOUT)
    world = _world(task)
    assert world.exemplars.shape == (6 + 5, 1 + 3, 40) and world.heldout_means.shape == (5, 40)
    assert task.evaluation_sets == ("train", "heldout_exemplars", "heldout_classes")
    noise = task.epsilon  # the within-class noise's norm is about epsilon (eta ~ N(0, I/D))
    for split, exemplars, classes in (("train", {0}, range(6)), ("heldout_exemplars", {1, 2, 3}, range(6)),
                                      ("heldout_classes", {0}, range(6, 11))):
        batch = sample(task, world, 400, torch.Generator().manual_seed(1), split)
        chosen, distance = _nearest_exemplar(task, world, batch)
        assert set(np.unique(chosen)) == exemplars, split
        assert distance.max() < 2 * noise, split
        assert set(batch.context_classes.unique().tolist()) == set(classes), split
        assert bool((batch.context_classes == batch.query_class.unsqueeze(1)).any(1).all())
    spread = (world.exemplars[:6, 0] - world.exemplars[:6, 1]).norm(dim=-1)
    assert float(spread.min()) > 4 * noise  # held-out exemplars are other points of the class, not noise


def test_held_out_settings_that_cannot_work_fail_in_one_line():
    with pytest.raises(LabError, match="heldout_exemplars needs task.n_exemplars"):
        TaskConfig(**{**HELDOUT, "n_exemplars": 0})
    with pytest.raises(LabError, match="heldout_classes needs task.relabel"):
        TaskConfig(**{**HELDOUT, "relabel": False, "n_labels": 6})
    with pytest.raises(LabError, match=r"heldout_classes \(1\) is below task.n_pairs"):
        TaskConfig(**{**HELDOUT, "heldout_classes": 1})
    with pytest.raises(LabError, match="exemplar_spread must be >= 0"):
        TaskConfig(**{**HELDOUT, "exemplar_spread": -1.0})
    with pytest.raises(LabError, match="unconfigured evaluation set 'heldout_classes'"):
        task = TaskConfig(**{**HELDOUT, "heldout_classes": 0})
        sample(task, _world(task), 4, torch.Generator(), "heldout_classes")


def test_the_singh_presets_have_s_held_out_evaluation():
    task = preset("singh").task
    assert (task.n_classes, task.n_exemplars) == (50, 1) and task.heldout_exemplars > 0 and task.heldout_classes > 0
    assert preset("singh-quick").task == task


def test_a_run_records_loss_and_accuracy_per_evaluation_set_and_a_phase_change_for_each(tiny, tmp_path):
    config = replace(tiny, task=TaskConfig(**HELDOUT), model=replace(tiny.model, width=45, embed="linear"))
    curves = train(config, tmp_path / "run", progress=False).load()
    assert curves["heldout_loss"].dims == ("step", "seed", "heldout")
    assert list(curves["heldout"].values) == ["heldout_exemplars", "heldout_classes"]
    assert np.isfinite(curves["heldout_loss"]).all() and np.isfinite(curves["heldout_accuracy"]).all()
    trainer = Trainer(config, tmp_path / "run")  # the same weights at the last step: recompute one value
    trainer._resume()
    batch = trainer.eval_sets["heldout_classes"]
    with torch.no_grad():
        logits = trainer.model(batch.tokens)
    accuracy = (logits.argmax(-1) == batch.label).float().mean().item()
    assert curves["heldout_accuracy"].isel(step=-1).sel(heldout="heldout_classes").item() == pytest.approx(accuracy)
    steps = phase_change_steps(curves, threshold=10.0)  # every loss is below 10: the first evaluation, step 0
    assert steps.dims == ("evaluation", "seed")
    assert list(steps["evaluation"].values) == ["train", "heldout_exemplars", "heldout_classes"]
    assert (steps.values == 0).all()


def test_phase_change_per_evaluation_set_on_known_curves():
    loss = np.array([[0.7], [0.5], [0.2], [0.1]])
    heldout = np.array([[[0.7, 0.7]], [[0.25, 0.7]], [[0.2, 0.6]], [[0.1, 0.5]]])
    curves = xr.Dataset({"loss": (("step", "seed"), loss), "heldout_loss": (("step", "seed", "heldout"), heldout)},
                        coords={"step": [0, 10, 20, 30], "seed": [0], "heldout": ["heldout_exemplars",
                                                                                   "heldout_classes"]})
    steps = phase_change_steps(curves)
    assert steps.sel(evaluation="train").item() == 20 and steps.sel(evaluation="heldout_exemplars").item() == 10
    assert np.isnan(steps.sel(evaluation="heldout_classes").item())
    plain = phase_change_steps(curves.drop_vars(["heldout_loss", "heldout"]))
    assert list(plain["evaluation"].values) == ["train"]
