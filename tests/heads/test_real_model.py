"""Integration tests on the real default model (Gemma 3 270M: 18 layers x 4 heads); about 2-3 minutes in all."""

import numpy as np
import pandas as pd
import pytest

from extraction.extractor import accuracy, extract
from extraction.interventions import HeadAblation
from heads.scores import score
from heads.selection import layer_placement, random_heads, select_sets

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def real_scores(real_model):
    return score(real_model, task="sentiment", shots=8, n=50, seed=0, progress=False)


def top(values: np.ndarray, k: int = 5) -> list[tuple[int, int, float]]:
    order = np.argsort(-values, axis=None)[:k]
    return [(int(i // values.shape[1]), int(i % values.shape[1]), round(float(values.flat[i]), 3)) for i in order]


def test_classic_induction_detector_finds_induction_heads(real_scores):
    induction = real_scores["induction"].values
    print("\ntop induction-detector scores (layer, head, score):", top(induction))
    print("top previous-token-detector scores:", top(real_scores["previous_token"].values))
    print("top PTH scores:", top(real_scores["pth"].values), "top IH scores:", top(real_scores["ih"].values))
    # a random head would put ~1/26 of its attention on the induction target; real induction heads put most of it
    assert induction.max() > 0.5
    assert np.median(induction) < 0.1


def test_ablating_induction_heads_hurts_more_than_random_heads(real_model, real_scores, tmp_path):
    arch = real_model.arch
    sets = select_sets(real_scores, fraction=0.1)
    sets["random"] = random_heads(arch.n_layers, arch.n_heads, len(sets["ih"]), exclude=sets["pth"] + sets["ih"],
                                  seed=0)
    placement = layer_placement(sets["ih"], sets["pth"], names=("ih", "pth"))
    store, common = tmp_path / "real.zarr", dict(task="sentiment", shots=8, n=64, seed=0, progress=False)
    rows = {"normal": accuracy(extract(real_model, store, **common))}
    for name in ("ih", "random"):
        ablation = HeadAblation(sets[name], origin={"set": name})
        rows[f"without {name}"] = accuracy(extract(real_model, store, setting=f"ablate_{name}",
                                                   intervention=ablation, **common))
    table = pd.DataFrame(rows).T
    print(f"\nsets: {sets}\nplacement: {placement}\n8-shot sentiment, n=64:\n{table}")
    assert rows["without ih"]["accuracy"] < rows["without random"]["accuracy"] - 0.2
    assert rows["without ih"]["accuracy"] < rows["normal"]["accuracy"] - 0.2
