import numpy as np
import pytest
import xarray as xr

from heads.errors import HeadsError
from heads.selection import layer_placement, parse_heads, random_heads, select_sets, set_size, top_heads


def fake_scores(layers=6, heads=4, seed=0):
    rng = np.random.default_rng(seed)
    coords = {"block": np.arange(layers), "head": np.arange(heads)}
    return xr.Dataset({name: (("block", "head"), rng.random((layers, heads))) for name in ("pth", "ih")}, coords=coords)


def test_top_heads_are_the_highest_scores_in_order():
    scores = fake_scores()
    values = scores["ih"].values
    top = top_heads(scores, "ih", k=5)
    assert [values[h] for h in top] == sorted(values.ravel(), reverse=True)[:5]
    assert len(top_heads(scores, "ih", fraction=0.1)) == 2  # 10% of 24 = 2.4 -> 2
    assert len(top_heads(scores, "ih", fraction=0.25)) == 6
    assert set_size(18, 4, fraction=0.1) == 7


def test_exclusion_skips_heads_and_refills():
    scores = fake_scores()
    top = top_heads(scores, "ih", k=4)
    without = top_heads(scores, "ih", k=4, exclude=top[:2])
    assert without[:2] == top[2:] and not set(without) & set(top[:2]) and len(without) == 4


def test_overlap_policy():
    scores = fake_scores()
    scores["ih"] = scores["pth"] + 0.01 * scores["ih"]  # nearly the same ranking: large overlap
    keep = select_sets(scores, k=4)
    assert set(keep["pth"]) & set(keep["ih"])
    only_pth = select_sets(scores, k=4, overlap="pth")
    assert only_pth["pth"] == keep["pth"] and not set(only_pth["ih"]) & set(only_pth["pth"])
    assert len(only_pth["ih"]) == 4
    only_ih = select_sets(scores, k=4, overlap="ih")
    assert only_ih["ih"] == keep["ih"] and not set(only_ih["pth"]) & set(only_ih["ih"])
    with pytest.raises(HeadsError, match="overlap must be"):
        select_sets(scores, overlap="both")


def test_random_control_avoids_top_heads_and_is_seeded():
    scores = fake_scores()
    sets = select_sets(scores, k=5)
    excluded = sets["pth"] + sets["ih"]
    for seed in range(20):
        drawn = random_heads(6, 4, 5, exclude=excluded, seed=seed)
        assert len(drawn) == len(set(drawn)) == 5 and not set(drawn) & set(excluded)
    assert random_heads(6, 4, 5, exclude=excluded, seed=3) == random_heads(6, 4, 5, exclude=excluded, seed=3)
    assert random_heads(6, 4, 5, seed=3) != random_heads(6, 4, 5, seed=4)
    with pytest.raises(HeadsError, match="cannot draw 20 random heads: 14"):
        random_heads(6, 4, 20, exclude=excluded)


def test_size_errors():
    scores = fake_scores()
    with pytest.raises(HeadsError, match="fraction must be in"):
        top_heads(scores, "ih", fraction=0)
    with pytest.raises(HeadsError, match="k must be between 1 and"):
        top_heads(scores, "ih", k=25)
    with pytest.raises(HeadsError, match="no score 'nope'"):
        top_heads(scores, "nope")
    with pytest.raises(HeadsError, match="not \\(block, head\\)"):
        top_heads(scores.rename({"block": "layer"}), "ih")  # head data are indexed by block, not layer


def test_layer_placement_means_and_test():
    deep = [(10, 0), (11, 1), (12, 2), (13, 0)]
    shallow = [(1, 0), (2, 1), (3, 0), (2, 2)]
    placement = layer_placement(deep, shallow, names=("ih", "pth"))
    assert placement.mean_a == 11.5 and placement.mean_b == 2.0
    assert placement.u_statistic == 16 and placement.p_value < 0.05
    assert layer_placement(deep, deep).p_value == pytest.approx(1.0)
    with pytest.raises(HeadsError, match="non-empty"):
        layer_placement([], deep)


def test_parse_heads():
    assert parse_heads("3.1, 10.0") == [(3, 1), (10, 0)]
    for bad in ("3", "a.b", "3.1,x", ""):
        with pytest.raises(HeadsError, match="BLOCK.HEAD"):
            parse_heads(bad)
