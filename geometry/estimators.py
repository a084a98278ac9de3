"""scikit-learn style estimators around the pure measures: ``fit(H, y)`` measures, ``score(H, y)`` re-measures.

``fit`` validates the parameters and the data, computes the measure with the pure function of
:mod:`geometry.measures` and stores it in ``value_`` (with per-pair details where the measure is pairwise);
``score`` returns the same measure on other data (held-out queries, another layer), checking that it has the
fitted width and no unseen classes. Nothing is re-implemented here. Errors are :class:`geometry.MeasureError`,
a ``ValueError`` as scikit-learn expects.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_is_fitted

from geometry import measures
from geometry.errors import MeasureError
from geometry.validation import check_fraction, check_int, check_labels, check_states, to_numpy

ALIGNMENT_KINDS = ("singular", "variance", "mean", "composite")


class _Measure(BaseEstimator):
    """Shared fit/score plumbing: subclasses define ``_check_params`` and ``_measure``."""

    #: Whether the measure reads class labels (``y``).
    uses_labels = True

    def _check_params(self) -> None:
        """Raise :class:`MeasureError` for a bad constructor parameter (checked at fit, as scikit-learn does)."""

    def _measure(self, H: np.ndarray, y: np.ndarray | None) -> tuple[float, dict[str, Any]]:
        """The measure and the extra fitted attributes (name ending in ``_`` -> value)."""
        raise NotImplementedError

    def _check_data(self, H: Any, y: Any, fitting: bool) -> tuple[np.ndarray, np.ndarray | None]:
        states = check_states(H)
        labels = check_labels(y, len(states)) if self.uses_labels else None
        if fitting:
            return states, labels
        if states.shape[1] != self.n_features_in_:
            raise MeasureError(f"H has {states.shape[1]} features but the estimator was fitted with "
                               f"{self.n_features_in_}")
        unseen = np.setdiff1d(labels, self.classes_) if labels is not None else []
        if len(unseen):
            raise MeasureError(f"y has classes {unseen.tolist()} that were not seen in fit")
        return states, labels

    def fit(self, H: Any, y: Any = None) -> "_Measure":
        """Measure (H, y) and store the result in ``value_`` (plus the measure's extra attributes)."""
        self._check_params()
        states, labels = self._check_data(H, y, fitting=True)
        self.n_features_in_ = states.shape[1]
        self.classes_ = np.unique(labels) if labels is not None else np.array([], dtype=np.int64)
        self.value_, extras = self._measure(states, labels)
        for name, value in extras.items():
            setattr(self, name, value)
        return self

    def score(self, H: Any, y: Any = None) -> float:
        """The measure of (H, y), e.g. held-out queries or another layer, with the fitted parameters."""
        check_is_fitted(self, "value_")
        return self._measure(*self._check_data(H, y, fitting=False))[0]


class Separability(_Measure):
    """Held-out accuracy of a logistic-regression probe (:func:`geometry.separability`)."""

    def __init__(self, seed: int = 0, test_size: float = 0.5, cv: int | None = None):
        self.seed = seed
        self.test_size = test_size
        self.cv = cv

    def _check_params(self) -> None:
        check_int(self.seed, "seed", 0)
        check_fraction(self.test_size, "test_size")
        if self.cv is not None:
            check_int(self.cv, "cv", 2)

    def _measure(self, H: np.ndarray, y: np.ndarray | None) -> tuple[float, dict[str, Any]]:
        return measures.separability(H, y, seed=self.seed, test_size=self.test_size, cv=self.cv), {}


class Alignment(_Measure):
    """Alignment of class structure with the label words' unembedding rows (``kind``: singular, variance, mean or
    composite; see :mod:`geometry.measures`). After fit: ``value_`` (pair average), ``pairs_``, ``pair_values_``
    (one per pair) and ``directions_`` (the unit vectors d, one row per pair)."""

    def __init__(self, unembedding: Any = None, kind: str = "composite"):
        self.unembedding = unembedding
        self.kind = kind

    def _check_params(self) -> None:
        if self.kind not in ALIGNMENT_KINDS:
            raise MeasureError(f"kind must be one of {', '.join(ALIGNMENT_KINDS)}, not {self.kind!r}")
        if self.unembedding is None:
            raise MeasureError("Alignment needs unembedding=U, the (classes, dim) label-word unembedding rows")

    def _measure(self, H: np.ndarray, y: np.ndarray | None) -> tuple[float, dict[str, Any]]:
        result = measures.alignment_by_pair(H, y, self.unembedding)
        per_pair = getattr(result, self.kind)
        extras = {"pairs_": result.pairs, "pair_values_": per_pair, "directions_": result.directions}
        return float(np.mean(per_pair)), extras


class EffectiveDimension(_Measure):
    """Participation ratio of the centred states' singular values (:func:`geometry.effective_dimension`)."""

    uses_labels = False

    def _measure(self, H: np.ndarray, y: np.ndarray | None) -> tuple[float, dict[str, Any]]:
        return measures.effective_dimension(H), {}


class DenoisingGain(_Measure):
    """Lens accuracy gain of the rank-``rank`` reconstruction (:func:`geometry.denoising_gain`); after fit also
    ``raw_accuracy_`` and ``denoised_accuracy_``."""

    def __init__(self, lens_unembed: Any = None, lens_bias: Any = None, rank: int = 10, center: bool = False):
        self.lens_unembed = lens_unembed
        self.lens_bias = lens_bias
        self.rank = rank
        self.center = center

    def _check_params(self) -> None:
        check_int(self.rank, "rank", 1)
        if self.lens_unembed is None:
            raise MeasureError("DenoisingGain needs lens_unembed, the store's (classes, dim) lens rows")
        if self.lens_bias is not None and to_numpy(self.lens_bias).shape != (len(to_numpy(self.lens_unembed)),):
            raise MeasureError("lens_bias must have one entry per row of lens_unembed")

    def _measure(self, H: np.ndarray, y: np.ndarray | None) -> tuple[float, dict[str, Any]]:
        raw, denoised = measures.denoising_hits(H, y, self.lens_unembed, self.lens_bias, rank=self.rank,
                                                center=self.center)
        extras = {"raw_accuracy_": float(raw.mean()), "denoised_accuracy_": float(denoised.mean())}
        return extras["denoised_accuracy_"] - extras["raw_accuracy_"], extras
