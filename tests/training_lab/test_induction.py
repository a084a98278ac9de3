import math
from dataclasses import replace

import numpy as np
import xarray as xr

from training_lab.induction import induction_strength, phase_change_step
from training_lab.store import open_run
from training_lab.train import train


def test_phase_change_step_is_the_first_evaluation_below_0_4_ln2():
    loss = np.array([[0.7, 0.7], [0.5, 0.2], [0.27, 0.1], [0.1, 0.1]])
    curves = xr.Dataset({"loss": (("step", "seed"), loss)}, coords={"step": [0, 10, 20, 30], "seed": [0, 1]})
    assert 0.4 * math.log(2) < 0.28
    np.testing.assert_array_equal(phase_change_step(curves).values, [20, 10])
    assert np.isnan(phase_change_step(curves, threshold=0.05).values).all()


def test_induction_strength_is_attention_to_the_correct_minus_the_wrong_label(tiny, tmp_path):
    config = replace(tiny, task=replace(tiny.task, n_tasks=1, query_in_context=True),
                     train=replace(tiny.train, steps=3))
    train(config, tmp_path / "run", progress=False)
    snaps = open_run(tmp_path / "run", "snapshots").load()
    assert snaps["context_class"].dims == ("seed", "example", "pair")
    strength = induction_strength(snaps)
    assert strength.dims == ("step", "seed", "block", "head")
    pattern, classes = snaps["pattern"].values, snaps["context_class"].values  # N = 2 pairs: labels at keys 1, 3
    first = classes[..., 0] == snaps["query_class"].values  # (seed, example)
    row = pattern[..., -1, :]  # (step, seed, block, head, example, key)
    to_first, to_second = row[..., 1], row[..., 3]
    expected = np.where(first[:, None, None], to_first - to_second, to_second - to_first).mean(-1)
    np.testing.assert_allclose(strength.values, expected, rtol=1e-5, atol=1e-6)


def test_the_singh_presets_are_s_setting_and_train(tmp_path):
    from training_lab.config import preset

    paper, quick = preset("singh"), preset("singh-quick")
    assert (paper.task.n_pairs, paper.task.n_labels, paper.task.n_classes, paper.task.relabel) == (2, 5, 50, True)
    assert (paper.model.width, paper.model.n_heads, paper.model.pre_norm, paper.model.positions) == (64, 8, True,
                                                                                                    "rotary")
    assert (paper.train.optimizer, paper.train.lr, paper.train.batch_size) == ("adam", 1e-5, 32)
    assert quick.task == paper.task and quick.model == paper.model
    config = replace(quick, train=replace(quick.train, steps=4, eval_examples=16, snapshot_examples=16))
    train(config, tmp_path / "run", progress=False)
    strength = induction_strength(open_run(tmp_path / "run", "snapshots").load())
    assert strength.sizes["head"] == 8 and np.isfinite(strength.values).all()
