"""The scikit-learn style estimators wrap the pure functions: same values, fitted attributes, validated params."""

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

from geometry import (Alignment, DenoisingGain, EffectiveDimension, MeasureError, Separability, alignment_by_pair,
                      composite_alignment, denoising_gain, effective_dimension, mean_alignment, separability)

rng = np.random.default_rng(0)
CENTRES = rng.normal(size=(3, 6)) * 3
Y = np.arange(60) % 3
H = CENTRES[Y] + rng.normal(size=(60, 6))
U = rng.normal(size=(3, 6))


def test_estimators_return_the_pure_functions_values():
    assert Separability(seed=3).fit(H, Y).value_ == separability(H, Y, seed=3)
    assert Separability(cv=3).fit(H, Y).value_ == separability(H, Y, cv=3)
    assert Alignment(U).fit(H, Y).value_ == pytest.approx(composite_alignment(H, Y, U))
    assert Alignment(U, kind="mean").fit(H, Y).value_ == pytest.approx(mean_alignment(H, Y, U))
    assert EffectiveDimension().fit(H).value_ == pytest.approx(effective_dimension(H))
    gain = DenoisingGain(U, rank=2).fit(H, Y)
    assert gain.value_ == pytest.approx(denoising_gain(H, Y, U, rank=2))
    assert gain.value_ == pytest.approx(gain.denoised_accuracy_ - gain.raw_accuracy_)


def test_alignment_fitted_attributes():
    fitted = Alignment(U, kind="variance").fit(H, Y)
    expected = alignment_by_pair(H, Y, U)
    assert fitted.pairs_ == [(0, 1), (0, 2), (1, 2)]
    np.testing.assert_allclose(fitted.pair_values_, expected.variance)
    np.testing.assert_allclose(np.linalg.norm(fitted.directions_, axis=1), 1.0)
    assert fitted.n_features_in_ == 6 and list(fitted.classes_) == [0, 1, 2]


def test_score_measures_other_data_with_the_fitted_setup():
    fitted = Alignment(U).fit(H[:30], Y[:30])
    assert fitted.score(H[30:], Y[30:]) == pytest.approx(composite_alignment(H[30:], Y[30:], U))
    with pytest.raises(MeasureError, match="H has 5 features but the estimator was fitted with 6"):
        fitted.score(H[:, :5], Y)
    with pytest.raises(MeasureError, match=r"y has classes \[3\] that were not seen in fit"):
        Alignment(U).fit(H[Y < 2], Y[Y < 2]).score(H, np.where(Y == 2, 3, Y))
    with pytest.raises(NotFittedError):
        Separability().score(H, Y)


def test_parameters_are_validated_at_fit_and_estimators_clone():
    with pytest.raises(MeasureError, match="kind must be one of singular, variance, mean, composite"):
        Alignment(U, kind="cosine").fit(H, Y)
    with pytest.raises(MeasureError, match="Alignment needs unembedding=U"):
        Alignment().fit(H, Y)
    with pytest.raises(MeasureError, match="test_size must be a number strictly between 0 and 1"):
        Separability(test_size=0).fit(H, Y)
    with pytest.raises(MeasureError, match="seed must be an integer >= 0"):
        Separability(seed=-1).fit(H, Y)
    with pytest.raises(MeasureError, match="rank must be an integer >= 1"):
        DenoisingGain(U, rank=0).fit(H, Y)
    with pytest.raises(MeasureError, match="lens_bias must have one entry per row"):
        DenoisingGain(U, lens_bias=np.zeros(2)).fit(H, Y)
    with pytest.raises(MeasureError, match="at least 2 classes"):
        Alignment(U).fit(H, np.zeros(60, dtype=int))
    copy = clone(Alignment(U, kind="mean"))
    assert copy.get_params()["kind"] == "mean" and not hasattr(copy, "value_")
