"""Edge scans: the fast scan equals the naive one-forward-per-cell loop, on tiny models of several architectures."""

from __future__ import annotations

import numpy as np
import pytest

from extraction.donors import DonorSpec
from extraction.errors import InterventionError
from extraction.models import load_model
from heads.errors import HeadsError
from heads.flow import edge_scan, flow_table

ARCHITECTURES = ["llama", "gemma2", "gemma3", "gpt2", "qwen2", "mistral"]
SETTINGS = dict(task="sentiment", shots=3, n=6, seed=1, width=2, batch_size=4, n_boot=200, progress=False)


@pytest.fixture(scope="module", params=ARCHITECTURES)
def loaded(request, tiny_model_dirs):
    return load_model(str(tiny_model_dirs[request.param]))


def test_fast_scan_equals_naive_loop(loaded):
    fast = edge_scan(loaded, method="fast", **SETTINGS)
    naive = edge_scan(loaded, method="naive", **SETTINGS)
    np.testing.assert_allclose(fast["label_logits"], naive["label_logits"], atol=1e-4, rtol=1e-4)
    np.testing.assert_array_equal(fast["top_token"], naive["top_token"])
    for name in ("accuracy_change", "vocab_accuracy", "logit_change", "logit_change_low"):
        np.testing.assert_allclose(fast[name], naive[name], atol=1e-4)
    # knockouts change the answer somewhere
    assert np.abs(fast["logit_change"].values).max() > 1e-4


def test_fast_patch_scan_equals_naive_loop(loaded):
    """Patching the edges from donor prompts of other lengths (other demonstrations; x_i do not align, so the edges
    that send from x are left out): the fast method (shared clean pass, one donor pass) equals one full forward pass
    per cell with EdgePatch."""
    donor = "demos:1"
    settings = {**SETTINGS, "mode": "patch", "donor": donor, "edges": ["y->x", "y->y", "y->final", "query->final"]}
    fast = edge_scan(loaded, method="fast", **settings)
    naive = edge_scan(loaded, method="naive", **settings)
    np.testing.assert_allclose(fast["label_logits"], naive["label_logits"], atol=1e-4, rtol=1e-4)
    np.testing.assert_array_equal(fast["top_token"], naive["top_token"])
    np.testing.assert_allclose(fast["logit_change"], naive["logit_change"], atol=1e-4)
    assert np.abs(fast["logit_change"].values).max() > 1e-4
    assert fast.attrs["mode"] == "patch" and fast.attrs["donor"] == DonorSpec.parse(donor).text


def test_scan_layout_and_table(tiny_gemma):
    ds = edge_scan(tiny_gemma, **SETTINGS)
    assert ds["accuracy"].dims == ("edge", "window")
    assert list(ds["edge"].values) == ["y->x", "y->y", "x->y", "y->final", "x->final", "query->final"]
    assert list(ds["window"].values) == [0, 1, 2] and list(ds["window_last"].values) == [1, 2, 3]
    assert (ds["logit_change_low"] <= ds["logit_change"]).all()
    assert (ds["logit_change"] <= ds["logit_change_high"]).all()
    table = flow_table(ds)
    assert len(table) == 6 * 3 * len({"accuracy", "accuracy_change", "vocab_accuracy", "vocab_accuracy_change",
                                       "logit_change"})
    assert set(table.columns) == {"mode", "donor", "edge", "window", "window_last", "quantity", "value", "low",
                                  "high"}
    assert (table["mode"] == "knockout").all() and (table["donor"] == "").all()
    patched = flow_table(edge_scan(tiny_gemma, mode="patch", edges=["y->final"], **SETTINGS))
    assert (patched["mode"] == "patch").all() and (patched["donor"] == "shuffled:0").all()


def test_bad_scan_input(tiny_gemma):
    with pytest.raises(InterventionError, match="unknown edge type"):
        edge_scan(tiny_gemma, edges=["y->q"], **SETTINGS)
    with pytest.raises(HeadsError, match="window width 9 does not fit the model's 4 blocks"):
        edge_scan(tiny_gemma, **{**SETTINGS, "width": 9})
    with pytest.raises(InterventionError, match="connects no positions"):
        edge_scan(tiny_gemma, edges=["y->y"], **{**SETTINGS, "shots": 1})
    with pytest.raises(HeadsError, match="unknown scan mode 'ablate'; use one of knockout, patch"):
        edge_scan(tiny_gemma, mode="ablate", **SETTINGS)
    with pytest.raises(HeadsError, match="a donor is used only by mode='patch'"):
        edge_scan(tiny_gemma, donor="shuffled", **SETTINGS)
    with pytest.raises(InterventionError, match="unknown donor 'other'"):
        edge_scan(tiny_gemma, mode="patch", donor="other", **SETTINGS)
    for method in ("fast", "naive"):
        with pytest.raises(InterventionError, match="cannot be aligned"):
            edge_scan(tiny_gemma, mode="patch", donor="demos:1", edges=["x->final"], method=method, **SETTINGS)


@pytest.mark.real_model
def test_small_scan_on_the_real_model(real_model):
    """Gemma 3 270M: every edge type over 2 windows (width L - 1), 4 three-shot prompts."""
    width = real_model.arch.n_layers - 1
    ds = edge_scan(real_model, task="sentiment", shots=3, n=4, width=width, batch_size=4, n_boot=100, progress=False)
    assert (ds.sizes["edge"], ds.sizes["window"], ds.sizes["example"]) == (6, 2, 4)
    assert np.isfinite(ds["logit_change"].values).all()
    # knocking out y->final in nearly every block changes the answer's logit
    assert np.abs(ds["logit_change"].sel(edge="y->final").values).max() > 1e-3


@pytest.mark.real_model
def test_small_patch_scan_on_the_real_model(real_model):
    """Gemma 3 270M (sliding-window and full-attention blocks, GQA): the aggregation and contextualization edges
    patched from shuffled-label donors over 2 windows; the fast scan equals the naive loop."""
    width = real_model.arch.n_layers - 1
    settings = dict(task="sentiment", shots=3, n=2, width=width, batch_size=2, n_boot=50, progress=False,
                    mode="patch", donor="shuffled:1", edges=["y->x", "y->final"])
    fast = edge_scan(real_model, method="fast", **settings)
    naive = edge_scan(real_model, method="naive", **settings)
    np.testing.assert_allclose(fast["label_logits"], naive["label_logits"], atol=2e-3, rtol=1e-3)
    assert np.isfinite(fast["logit_change"].values).all()
    assert np.abs(fast["logit_change"].sel(edge="y->final").values).max() > 1e-3
