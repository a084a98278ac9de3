"""Phase detection on synthetic accuracy curves with known transitions, and circuits named from known metrics."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from geometry.errors import MeasureError
from training_lab.phases import (Transition, boundary_mask, classify_circuit, detect_phases, locate, phase_circuits,
                                 phase_starts, seed_transitions, transitions)


def ramp(steps: np.ndarray, at: float, width: float, low: float, high: float) -> np.ndarray:
    """Accuracy rising linearly from ``low`` to ``high`` between ``at`` and ``at + width``."""
    return low + (high - low) * np.clip((steps - at) / width, 0, 1)


def three_phase(steps: np.ndarray) -> np.ndarray:
    """[M]'s shape: about 1/3, a rise to 0.75 at step 2,000, a rise to 1.0 at step 6,000 (each over 200 steps)."""
    return ramp(steps, 2000, 200, 0.33, 0.75) + ramp(steps, 6000, 200, 0.0, 0.25)


def test_regular_steps_find_the_two_rises():
    steps = np.arange(0, 10_001, 10)
    result = detect_phases(three_phase(steps), steps)
    found = seed_transitions(result, 0)
    assert len(found) == 2
    # A rise of 0.42 over 200 steps is 0.021 per 10 steps, so t is a boundary from 2000 - 100 + 12 to 2200 - 12:
    # the first and last evaluated ones are 1920 and 2180; the end is 2180 + 100.
    assert found[0] == Transition(1920, 2280)
    assert found[1] == Transition(5920, 6280)
    phase = result["phase"].sel(seed=0)
    assert int(phase.sel(step=1000)) == 0 and int(phase.sel(step=4000)) == 1 and int(phase.sel(step=9000)) == 2
    assert bool(result["in_transition"].sel(seed=0, step=2100))
    assert not bool(result["in_transition"].sel(seed=0, step=2280))
    assert phase_starts(result, 0) == [0, 2280, 6280]
    assert result.attrs["window"] == 100 and result.attrs["threshold"] == 0.025


def test_noise_below_the_threshold_makes_no_boundary():
    steps = np.arange(0, 10_001, 10)
    noisy = three_phase(steps) + np.random.default_rng(0).uniform(-0.01, 0.01, len(steps))
    assert len(seed_transitions(detect_phases(noisy, steps), 0)) == 2
    flat = 0.5 + np.random.default_rng(1).uniform(-0.01, 0.01, len(steps))
    assert not boundary_mask(steps, flat).any()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_smoothing_removes_spurious_boundaries_of_evaluation_noise(seed):
    steps = np.arange(0, 10_001, 10)
    noisy = three_phase(steps) + np.random.default_rng(seed).normal(0, 0.02, len(steps))
    assert len(seed_transitions(detect_phases(noisy, steps), 0)) > 2
    smooth = detect_phases(noisy, steps, smooth=15)
    first, second = seed_transitions(smooth, 0)  # smoothing over 150 steps starts the rises a little earlier
    assert 1800 <= first.start < 2000 <= 2200 <= first.end < 2400
    assert 5800 <= second.start < 6000 <= 6200 <= second.end < 6400
    assert smooth.attrs["smooth"] == 15


def test_window_and_threshold_are_parameters():
    steps = np.arange(0, 10_001, 10)
    slow = ramp(steps, 2000, 4000, 0.2, 0.8)  # 0.015 per 100 steps
    assert not boundary_mask(steps, slow).any()
    assert boundary_mask(steps, slow, threshold=0.01).any()
    assert boundary_mask(steps, slow, window=200).any()


def test_log_spaced_steps():
    steps = np.unique(np.round(np.logspace(1, 5, 200)).astype(int))
    acc = ramp(steps, 20_000, 2_000, 0.3, 0.9)  # 0.03 per 100 steps, evaluations about 1,000 steps apart there
    by_interpolation = detect_phases(acc, steps)
    found = seed_transitions(by_interpolation, 0)
    assert len(found) == 1 and 20_000 < found[0].start < 21_000 and 21_000 < found[0].end <= 23_000
    # An abrupt jump between two sparse evaluations: interpolation dilutes it below the rate, "next" sees it.
    jump = np.where(steps >= 50_000, 0.5, 0.3)  # 0.2 over a gap of about 2,300 steps: 0.009 per 100
    assert not boundary_mask(steps, jump).any()
    nxt = detect_phases(jump, steps, method="next")
    (only,) = seed_transitions(nxt, 0)
    assert only.end == steps[steps >= 50_000][0] and only.start == steps[steps < 50_000][-1]


def test_seeds_get_their_own_transitions():
    steps = np.arange(0, 5001, 10)
    curves = xr.DataArray(np.stack([ramp(steps, 1000, 100, 0, 1), ramp(steps, 3000, 100, 0, 1),
                                    np.full(len(steps), 0.5)], axis=1),
                          dims=("step", "seed"), coords={"step": steps, "seed": [7, 8, 9]})
    result = detect_phases(curves)
    assert list(result["n_transitions"].values) == [1, 1, 0]
    assert seed_transitions(result, 8)[0] == Transition(2910, 3190)
    assert np.isnan(result["transition_start"].sel(seed=9)).all()


def test_a_step_past_the_last_evaluation_is_not_judged():
    steps = np.array([0, 50, 100, 150])
    acc = np.array([0.0, 0.0, 0.0, 1.0])
    assert list(boundary_mask(steps, acc)) == [False, True, False, False]


def test_consecutive_and_overlapping_boundaries_merge():
    steps = np.arange(0, 1000, 10)
    mask = np.zeros(len(steps), bool)
    mask[[10, 11, 12, 14, 40]] = True  # steps 100-120 and 140 overlap (end 220), 400 is separate
    assert transitions(steps, mask, 100) == [Transition(100, 240), Transition(400, 500)]
    phase, inside = locate(np.array([0, 100, 239, 240, 450, 990]), transitions(steps, mask, 100))
    assert list(phase) == [0, 0, 0, 1, 1, 2] and list(inside) == [False, True, True, False, True, False]


@pytest.mark.parametrize("steps, acc, message", [
    ([0, 10, 10], [0.1, 0.2, 0.3], "strictly increasing"),
    ([0, 10], [0.1, np.nan], "NaN"),
    ([0, 10], [0.1], "one length"),
])
def test_bad_curves_are_refused(steps, acc, message):
    with pytest.raises(MeasureError, match=message):
        detect_phases(np.array(acc), np.array(steps))


def test_bad_rule_is_refused():
    with pytest.raises(MeasureError, match="window"):
        detect_phases(np.zeros(3), np.arange(3), window=0)
    with pytest.raises(MeasureError, match="smooth"):
        detect_phases(np.zeros(3), np.arange(3), smooth=2)
    with pytest.raises(MeasureError, match="method"):
        detect_phases(np.zeros(3), np.arange(3), method="closest")


def metrics(bigram: list[float], label: list[float], chunk: list[float]) -> xr.Dataset:
    """Circuit metrics of one step, per block."""
    dims = ("block",)
    return xr.Dataset({"bigram": (dims, bigram), "label_attention": (dims, label), "chunk_example": (dims, chunk)})


@pytest.mark.parametrize("values, circuit", [
    (([0.8, 0.7], [0.1, 0.2], [0.2, 0.2]), "bigram"),
    (([0.8, 0.3], [0.1, 0.2], [0.2, 0.2]), "none"),  # block 1's query spreads over the items
    (([0.1, 0.7], [0.8, 0.2], [0.2, 0.2]), "label_attention"),
    (([0.1, 0.1], [0.3, 0.9], [0.9, 0.2]), "chunk_example"),
    (([0.1, 0.1], [0.8, 0.9], [0.9, 0.2]), "chunk_example"),  # chunk example is checked first
    (([0.1, 0.1], [0.45, 0.45], [0.26, 0.26]), "none"),  # uniform attention
])
def test_circuit_rules(values, circuit):
    assert str(classify_circuit(metrics(*values)).values) == circuit


def test_phase_circuits_from_metrics_at_other_steps():
    steps = np.arange(0, 10_001, 10)
    phases = detect_phases(three_phase(steps), steps)
    measured = np.array([0, 1000, 2100, 3000, 5000, 7000, 9000])  # 2100 lies inside the first transition
    per_step = {0: metrics([0.8, 0.8], [0.1, 0.1], [0.2, 0.2]), 1: metrics([0.1, 0.7], [0.9, 0.1], [0.3, 0.3]),
                2: metrics([0.1, 0.1], [0.2, 0.9], [0.9, 0.3])}
    phase_of = {0: 0, 1000: 0, 2100: 1, 3000: 1, 5000: 1, 7000: 2, 9000: 2}
    steps_ds = [per_step[phase_of[s]] for s in measured]
    steps_ds[2] = metrics([0.3, 0.3], [0.3, 0.3], [0.3, 0.3])  # inside the transition: left out of the mean
    metric = xr.concat(steps_ds, dim="step").assign_coords(step=measured).expand_dims(seed=[0])
    result = phase_circuits(metric, phases)
    assert list(result["circuit"].sel(seed=0).values) == ["bigram", "label_attention", "chunk_example"]
    assert list(result["n_steps"].sel(seed=0).values) == [2, 2, 2]
    assert list(result["phase_start"].sel(seed=0).values) == [0, 2280, 6280]
    assert float(result["label_attention"].sel(seed=0, phase=1, block=0)) == pytest.approx(0.9)


def test_phase_without_measured_steps_is_unmeasured():
    steps = np.arange(0, 10_001, 10)
    phases = detect_phases(three_phase(steps), steps)
    metric = metrics([0.8, 0.8], [0.1, 0.1], [0.2, 0.2]).expand_dims(step=[500]).expand_dims(seed=[0])
    assert list(phase_circuits(metric, phases)["circuit"].sel(seed=0).values) == ["bigram", "unmeasured",
                                                                                  "unmeasured"]


def test_phase_circuits_named_by_rises_below_the_absolute_thresholds():
    """The [M] paper-preset run's phase means (window 2,000): no metric reaches 0.6, yet each later phase shows the
    next circuit's rise; a last phase with no rise keeps the most advanced circuit formed so far."""
    steps = np.arange(0, 10_001, 10)
    phases = detect_phases(three_phase(steps), steps)
    means = [metrics([0.95, 0.98], [0.03, 0.01], [0.26, 0.27]),  # bigram
             metrics([0.66, 0.97], [0.32, 0.02], [0.25, 0.25]),  # block 0's label attention +0.29
             metrics([0.84, 0.74], [0.15, 0.26], [0.41, 0.02])]  # block 0's chunk +0.16, block 1's label +0.24
    measured = np.array([1000, 4000, 9000])
    metric = xr.concat(means, dim="step").assign_coords(step=measured).expand_dims(seed=[0])
    result = phase_circuits(metric, phases)
    assert list(result["circuit"].sel(seed=0).values) == ["bigram", "label_attention", "chunk_example"]
    assert result.attrs["rise"] == 0.1
    assert list(phase_circuits(metric, phases, rise=0.3)["circuit"].sel(seed=0).values) == ["bigram"] * 3


def test_a_phase_without_a_new_rise_keeps_the_circuit_formed_before():
    steps = np.arange(0, 10_001, 10)
    phases = detect_phases(three_phase(steps), steps)
    means = [metrics([0.95, 0.98], [0.03, 0.01], [0.26, 0.27]), metrics([0.66, 0.97], [0.32, 0.02], [0.25, 0.25]),
             metrics([0.90, 0.97], [0.08, 0.02], [0.25, 0.25])]  # label attention relaxes: no new circuit
    metric = xr.concat(means, dim="step").assign_coords(step=[1000, 4000, 9000]).expand_dims(seed=[0])
    assert list(phase_circuits(metric, phases)["circuit"].sel(seed=0).values) == ["bigram", "label_attention",
                                                                                  "label_attention"]


def test_rise_must_be_positive():
    steps = np.arange(0, 10_001, 10)
    metric = metrics([0.8, 0.8], [0.1, 0.1], [0.2, 0.2]).expand_dims(step=[500]).expand_dims(seed=[0])
    with pytest.raises(MeasureError, match="rise"):
        phase_circuits(metric, detect_phases(three_phase(steps), steps), rise=0)
