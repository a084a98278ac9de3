"""Issue 9: estimators score new data with what fit learnt (item 9c); the appendix's unnormalised variance
alignment (item 11); the store lens's output scaling and its refusal when the final norm has no exact form (item 2)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from geometry import (Alignment, DenoisingGain, EffectiveDimension, MeasureError, Separability,
                      composite_alignment, effective_dimension, mean_alignment, variance_alignment)
from geometry.lens import lens_logits, normalise, store_lens

rng = np.random.default_rng(1)
D = 6
U = rng.normal(size=(3, D))


def _cloud(centres: np.ndarray, n: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    local = np.random.default_rng(seed)
    y = np.arange(n) % len(centres)
    return centres[y] + noise * local.normal(size=(n, centres.shape[1])), y


# Fit set A: classes apart along axis 0. Score set B: classes apart along axis 1 (as if an ablation moved them).
A_CENTRES = np.zeros((2, D)); A_CENTRES[0, 0], A_CENTRES[1, 0] = 4, -4
B_CENTRES = np.zeros((2, D)); B_CENTRES[0, 1], B_CENTRES[1, 1] = 4, -4
HA, YA = _cloud(A_CENTRES, 60, 1.0, 2)
HB, YB = _cloud(B_CENTRES, 60, 1.0, 3)


# --- item 9c: fit learns, score scores new data ----------------------------------------------------------------

def test_separability_scores_new_states_with_the_fitted_probe():
    fitted = Separability().fit(HA, YA)
    centre = HA.mean(axis=0)
    by_hand = LogisticRegression().fit(HA - centre, YA).score(HB - centre, YB)
    assert fitted.score(HB, YB) == pytest.approx(by_hand)
    assert fitted.score(HB, YB) < 0.8 < Separability().fit(HB, YB).value_  # not a refit on B


def test_alignment_scores_new_states_along_the_fitted_directions():
    other = rng.normal(size=(3, D))
    fitted = Alignment(U[:2], kind="variance").fit(HA, YA)
    fitted.set_params(unembedding=other[:2])  # scoring must use what fit learnt, not the current parameter
    d = (U[0] - U[1]) / np.linalg.norm(U[0] - U[1])
    centred = HB - HB.mean(axis=0)
    by_hand = (d @ centred.T @ centred @ d) / np.trace(centred.T @ centred)
    assert fitted.score(HB, YB) == pytest.approx(by_hand)
    assert fitted.score(HB, YB) != pytest.approx(Alignment(other[:2], kind="variance").fit(HB, YB).value_)


def test_alignment_score_keeps_only_the_fitted_pairs_present_in_the_new_labels():
    H, y = _cloud(rng.normal(size=(3, D)) * 3, 60, 1.0, 4)
    fitted = Alignment(U, kind="mean").fit(H, y)
    keep = y < 2
    assert fitted.score(H[keep], y[keep]) == pytest.approx(mean_alignment(H[keep], y[keep], U))
    with pytest.raises(MeasureError, match="at least two of the fitted classes"):
        fitted.score(H[y == 0], y[y == 0])


def test_denoising_gain_projects_new_states_onto_the_fitted_subspace():
    rows = np.zeros((2, D)); rows[0, :2], rows[1, :2] = 1, -1
    noisy_a = HA.copy(); noisy_a[:, 2] *= 8  # A's top principal direction: axis 2, then axis 0
    fitted = DenoisingGain(rows, rank=2).fit(noisy_a, YA)
    mean = noisy_a.mean(axis=0)
    basis = np.linalg.svd(noisy_a - mean, full_matrices=False)[2][:2]
    projected = mean + (HB - mean) @ basis.T @ basis
    raw = (normalise(HB) @ rows.T).argmax(axis=1) == YB
    denoised = (normalise(projected) @ rows.T).argmax(axis=1) == YB
    assert fitted.score(HB, YB) == pytest.approx(denoised.mean() - raw.mean())
    assert fitted.score(HB, YB) < -0.2 < DenoisingGain(rows, rank=2).fit(HB, YB).value_


def test_effective_dimension_learns_nothing_but_the_width():
    assert EffectiveDimension().fit(HA).score(HB) == pytest.approx(effective_dimension(HB))


# --- item 11: the appendix's unnormalised variance alignment ------------------------------------------------------

def _by_hand_pairs(H, y, rows):
    """Per pair (A < B): (dᵀ(H̄ᵀH̄/n)d, share of variance along d, mean alignment) on the pair's states."""
    out = []
    for a in range(len(rows)):
        for b in range(a + 1, len(rows)):
            keep = (y == a) | (y == b)
            d = (rows[a] - rows[b]) / np.linalg.norm(rows[a] - rows[b])
            centred = H[keep] - H[keep].mean(axis=0)
            raw = d @ (centred.T @ centred / keep.sum()) @ d
            out.append((raw, raw / np.trace(centred.T @ centred / keep.sum()),
                        mean_alignment(H[keep], y[keep], rows)))
    return np.array(out)


def test_unnormalised_variance_alignment_is_the_appendix_formula():
    H, y = _cloud(rng.normal(size=(3, D)) * 3, 90, 1.5, 5)
    H = H * 7.0  # the unnormalised form carries the states' scale, the proportion does not
    pairs = _by_hand_pairs(H, y, U)
    assert variance_alignment(H, y, U, normalize=False) == pytest.approx(pairs[:, 0].mean())
    assert variance_alignment(H, y, U) == pytest.approx(pairs[:, 1].mean())
    assert composite_alignment(H, y, U, normalize=False) == pytest.approx((pairs[:, 0] * pairs[:, 2]).mean())
    assert Alignment(U, kind="variance", normalize=False).fit(H, y).value_ == pytest.approx(pairs[:, 0].mean())


def test_sweep_cli_and_study_config_offer_and_record_the_unnormalised_form(tiny_store, tmp_path, capsys):
    import pandas as pd

    from extraction.store import open_group
    from geometry import measure
    from icl_geometry.cli import main
    from icl_geometry.config import dump_toml, load_config

    result = measure(tiny_store, "topic", measures=["variance_alignment", "composite_alignment"], n_boot=0,
                     normalize_variance=False, progress=False)
    assert result.attrs["normalize_variance"] is False
    ds = open_group(tiny_store, "topic")
    layer = int(ds["layer"][2])
    expected = variance_alignment(ds["hidden"].sel(layer=layer).values, ds["label"].values, ds["unembed"].values,
                                  normalize=False)
    assert float(result["value"].sel(layer=layer, measure="variance_alignment")) == pytest.approx(expected)

    out = tmp_path / "m.csv"
    assert main(["measure", str(tiny_store), "--group", "topic", "--measures", "variance_alignment",
                 "--n-boot", "0", "--raw-variance", "--out", str(out)]) == 0
    frame = pd.read_csv(out)
    assert not frame["normalize_variance"].any()
    row = frame[(frame.measure == "variance_alignment") & (frame.layer == layer)]
    assert float(row["value"].iloc[0]) == pytest.approx(expected, rel=1e-6)

    path = tmp_path / "study.toml"
    path.write_text("[geometry]\nnormalize_variance = false\n")
    config = load_config(path)
    assert config.geometry.normalize_variance is False
    assert "normalize_variance = false" in dump_toml(config)


# --- item 2: the store lens ------------------------------------------------------------------------------------------

def test_store_lens_applies_the_logit_scale_and_soft_cap(tiny_store):
    from extraction.store import open_group

    ds = open_group(tiny_store, "icl").load()
    H = ds["hidden"].isel(layer=2).values
    plain = lens_logits(H, ds["lens_unembed"].values, ds["lens_bias"].values, center=ds.attrs["lens_center"])
    np.testing.assert_allclose(store_lens(ds).logits(H), plain)  # old stores: scale 1, no cap
    ds.attrs.update(lens_logit_scale=3.0, lens_softcap=0.5)
    np.testing.assert_allclose(store_lens(ds).logits(H), 0.5 * np.tanh(3.0 * plain / 0.5))
    ds.attrs["lens_softcap"] = None
    np.testing.assert_allclose(store_lens(ds).logits(H), 3.0 * plain)


def test_inexact_final_norm_refuses_the_lens_measures(tiny_store, caplog):
    from extraction.store import open_group
    from geometry import measure

    ds = open_group(tiny_store, "icl").load()
    ds.attrs["lens_form_exact"] = False
    with pytest.raises(MeasureError, match="lens_form_exact=False"):
        store_lens(ds)
    with pytest.raises(MeasureError, match="lens_form_exact=False.*denoising_gain"):
        measure(ds, measures=["denoising_gain"], n_boot=0, progress=False)
    with caplog.at_level(logging.WARNING, logger="geometry.sweep"):
        result = measure(ds, n_boot=0, n_boot_separability=0, progress=False)
    assert "denoising_gain is skipped" in caplog.text
    assert result.attrs["skipped_measures"] == ["denoising_gain"]
    assert np.isnan(result["value"].sel(measure="denoising_gain")).all()
    assert np.isfinite(result["value"].sel(measure="separability")).all()


def test_semantic_decoding_refuses_a_norm_without_an_exact_form(tiny_gemma, tiny_store, monkeypatch, tmp_path):
    import shutil

    import extraction.architecture as architecture
    from geometry.semantic import decode_store_directions

    form = architecture.final_norm_form(tiny_gemma.arch)
    monkeypatch.setattr(architecture, "final_norm_form",
                        lambda arch: architecture.NormForm(form.gain, form.bias, form.center, False))
    store = tmp_path / "s.zarr"
    shutil.copytree(tiny_store, store)
    with pytest.raises(MeasureError, match="no gain/bias form"):
        decode_store_directions(tiny_gemma, store, "icl", layers=[1])
