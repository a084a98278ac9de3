"""[S]'s quick preset end to end: a free run shows the phase change on every evaluation set; a clamped run (a
perfect previous-token pattern in block 0) trains with its clamp holding."""

import time
from dataclasses import replace

import numpy as np
import pytest

from training_lab.clamps import ClampSpec
from training_lab.config import preset
from training_lab.induction import induction_strength, phase_change_steps
from training_lab.store import open_run
from training_lab.train import train


@pytest.mark.slow
def test_singh_quick_free_and_clamped_runs(tmp_path):
    config = preset("singh-quick")
    start = time.perf_counter()
    free = train(config, tmp_path / "free", progress=False).load()
    free_seconds = time.perf_counter() - start
    steps = phase_change_steps(free)
    print(f"free run {free_seconds:.0f} s; phase change per evaluation set: "
          f"{dict(zip(steps['evaluation'].values, steps.values[:, 0]))}")
    assert np.isfinite(steps.sel(evaluation="train")).all(), free["loss"].values
    assert float(free["accuracy"].isel(step=-1).min()) > 0.9
    strength = induction_strength(open_run(tmp_path / "free", "snapshots").load())
    assert float(strength.isel(step=-1).sel(block=1).max()) > 0.3  # a block-1 head attends to the correct label

    clamp = ClampSpec("attn.pattern", "previous_token", blocks=(0,))
    start = time.perf_counter()
    clamped = train(replace(config, clamps=(clamp,)), tmp_path / "clamped", progress=False).load()
    steps = phase_change_steps(clamped)
    print(f"previous-token clamped run {time.perf_counter() - start:.0f} s; phase change: "
          f"{dict(zip(steps['evaluation'].values, steps.values[:, 0]))}; final loss "
          f"{float(clamped['loss'].isel(step=-1).mean()):.3f}")
    assert np.isfinite(clamped["loss"]).all() and clamped.attrs["config"]["clamp"] == [clamp.to_dict()]
    pattern = clamped["mean_pattern"].sel(block=0).values  # (step, seed, head, query, key): the clamp held
    previous = np.eye(config.task.seq_len, k=-1)
    previous[0, 0] = 1.0
    np.testing.assert_array_equal(pattern, np.broadcast_to(previous, pattern.shape))
