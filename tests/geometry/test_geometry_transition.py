"""Transition detection on hand-made sweep results."""

import numpy as np
import pytest
import xarray as xr

from geometry import MeasureError, transition


def result(separation, composite, layers=None, group="icl"):
    layers = list(range(len(separation))) if layers is None else layers
    values = np.column_stack([separation, composite])
    nan = np.full_like(values, np.nan)
    dims = ("layer", "measure")
    return xr.Dataset({"value": (dims, values), "ci_low": (dims, nan), "ci_high": (dims, nan)},
                      coords={"layer": layers, "measure": ["separability", "composite_alignment"]},
                      attrs={"group": group})


def test_surge_after_the_plateau():
    separation = [0.5, 0.7, 0.96, 1.0, 0.99, 1.0, 1.0, 1.0]
    # a bigger jump before the plateau (layer 0 -> 1) does not count; after it, 4 -> 5 is the largest
    composite = [0.0, 0.5, 0.5, 0.52, 0.55, 0.9, 0.95, 1.0]
    found = transition(result(separation, composite))
    assert found.plateau_layer == 2 and found.layer == 4 and found.rise == pytest.approx(0.35)
    assert found.group == "icl" and "0.95" in found.method and found.to_dict()["layer"] == 4
    assert transition(result(separation, composite), plateau=0.6).plateau_layer == 1


def test_layer_coordinates_and_smoothing():
    separation = [1.0] * 9
    composite = [0.0, 0.0, 0.5, 0.0, 0.0, 0.3, 0.7, 1.0, 1.2]  # a one-layer blip at 2, then a steady rise
    assert transition(result(separation, composite, layers=[0, 3, 6, 9, 12, 15, 18, 21, 24])).layer == 3
    # 3-layer moving average: ... 0.1 (layer 4), 0.333, 0.667, 0.967, 1.1: the largest step is 5 -> 6
    smoothed = transition(result(separation, composite), smooth=3)
    assert smoothed.layer == 5 and "moving average over 3 layers" in smoothed.method


def test_no_surge_gives_no_transition():
    found = transition(result([0.5, 1.0, 1.0, 1.0], [0.3, 0.2, 0.1, 0.0]))
    assert found.layer is None and found.plateau_layer == 1 and np.isnan(found.rise)
    assert transition(result([0.5, 0.8, 1.0], [0.0, 0.0, 1.0])).layer is None  # plateau at the last layer


def test_bad_requests():
    with pytest.raises(MeasureError, match="needs the measures mean_alignment"):
        transition(result([1.0], [0.0]), alignment="mean_alignment")
    with pytest.raises(MeasureError, match="plateau must be in"):
        transition(result([1.0], [0.0]), plateau=1.5)


def test_rises_below_min_rise_are_no_transition():
    separation, composite = [0.5, 1.0, 1.0, 1.0], [0.0, 0.0, 0.01, 0.02]
    assert transition(result(separation, composite)).layer == 1
    assert transition(result(separation, composite), min_rise=0.05).layer is None
    with pytest.raises(MeasureError, match="min_rise"):
        transition(result(separation, composite), min_rise=-1)
