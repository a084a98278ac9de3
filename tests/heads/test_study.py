import numpy as np
import pytest

from extraction.errors import InterventionError
from extraction.store import list_groups, open_group
from heads import pipeline
from heads.errors import HeadsError
from heads.pipeline import SETTINGS, study
from heads.plots import plot_study

STUDY = dict(shots=3, n=10, n_score=6, progress=False)


def count_forwards(arch):
    calls = []
    handle = arch.layers[0].register_forward_pre_hook(lambda module, args: calls.append(1))
    return calls, handle


def test_study_writes_every_group_and_reruns_for_free(tiny_gemma, tmp_path, monkeypatch):
    store = tmp_path / "s.zarr"
    result = study(tiny_gemma, store, measures=False, **STUDY)
    assert set(list_groups(store)) == {*pipeline.ROLES, "head_scores"}
    assert list(result.accuracy.index) == list(SETTINGS)
    assert set(result.accuracy.columns) >= {"accuracy", "label_accuracy", "group"}
    sets = result.sets
    assert len(sets["pth"]) == len(sets["ih"]) == len(sets["random"]) == 2  # 10% of 16 heads
    assert not set(sets["random"]) & (set(sets["pth"]) | set(sets["ih"]))
    assert result.placement.mean_a == np.mean([l for l, _ in sets["ih"]])
    [ablated] = open_group(store, "ablate_ih").attrs["intervention"]
    assert ablated["heads"] == [list(h) for h in sets["ih"]] and ablated["origin"]["set"] == "ih"
    [injected] = open_group(store, "inject_ih").attrs["intervention"]
    assert injected["layer"] == 2 and injected["kind"] == "injection"  # round(3 * 4 / 8) = 2 (half up)
    assert injected["origin"]["heads"] == [list(h) for h in sets["ih"]] and "intervention0_vector" in open_group(
        store, "inject_ih")
    assert result.changes is None
    # a re-run reuses everything: no forward pass at all
    monkeypatch.setattr(pipeline, "task_vector", lambda *a, **k: pytest.fail("task vector recomputed"))
    calls, handle = count_forwards(tiny_gemma.arch)
    try:
        again = study(tiny_gemma, store, measures=False, **STUDY)
    finally:
        handle.remove()
    assert calls == [] and again.sets == sets
    assert again.accuracy.equals(result.accuracy)


def test_study_with_measures_and_figures(tiny_gemma, tmp_path):
    pytest.importorskip("geometry.sweep")
    store = tmp_path / "s.zarr"
    result = study(tiny_gemma, store, n_boot=10, groups={"icl": "three_shot"}, **STUDY)
    assert result.groups["icl"] == "three_shot" and "three_shot" in list_groups(store)
    changes = result.changes
    assert set(changes["group"]) == {"ablate_pth", "ablate_ih", "ablate_random", "inject_ih", "inject_pth"}
    assert set(changes.loc[changes["group"] == "ablate_ih", "baseline"]) == {"three_shot"}
    assert {"layer", "measure", "value", "baseline_value", "change"} <= set(changes.columns)
    rows = changes[changes["group"] == "ablate_pth"]
    np.testing.assert_allclose(rows["change"], rows["value"] - rows["baseline_value"])
    # before the first ablated block, the states (and so every measure) are unchanged
    first = min(l for l, _ in result.sets["pth"])
    assert np.nanmax(np.abs(rows.loc[rows["layer"] <= first, "change"].values)) < 1e-6
    paths = plot_study(result, tmp_path / "figures")
    assert {p.name for p in paths} == {f"{stem}.{fmt}" for stem in ("head_scores", "accuracy", "measure_changes")
                                       for fmt in ("png", "svg")}
    assert all(p.stat().st_size > 0 for p in paths)


def test_mean_ablation_study_and_argument_errors(tiny_gemma, tmp_path, monkeypatch):
    result = study(tiny_gemma, tmp_path / "s.zarr", mode="mean", measures=False, **STUDY)
    monkeypatch.setattr(pipeline, "head_means", lambda *a, **k: pytest.fail("head means recomputed"))
    study(tiny_gemma, tmp_path / "s.zarr", mode="mean", measures=False, **STUDY)  # re-uses the stored means
    [record] = open_group(tmp_path / "s.zarr", "ablate_pth").attrs["intervention"]
    assert record["mode"] == "mean" and "means" in record["data"]
    assert result.accuracy.loc["without PTH", "n"] == 10
    with pytest.raises(HeadsError, match="unknown group role"):
        study(tiny_gemma, tmp_path / "t.zarr", groups={"baseline": "x"}, **STUDY)
    with pytest.raises(InterventionError, match="injection layer 9 is out of range"):
        study(tiny_gemma, tmp_path / "t.zarr", pth_layer=9, **STUDY)
    with pytest.raises(HeadsError, match="unknown ablation mode"):
        study(tiny_gemma, tmp_path / "t.zarr", mode="half", **STUDY)
