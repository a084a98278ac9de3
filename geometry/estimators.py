"""scikit-learn style estimators around the measures: ``fit`` learns, ``score`` scores NEW data with what was learnt.

As scikit-learn's contract says, ``fit(H, y)`` learns from one set of states (say the ICL group's) and
``score(H, y)`` evaluates another (say the ablated group's) with what ``fit`` learnt, without refitting. What each
estimator learns:

* :class:`Separability`: the linear probe (``probe_``), trained on all of the fit data; ``score`` is its accuracy on
  the new states. ``value_`` is the measure of the fit data itself (held-out accuracy of a fresh split).
* :class:`Alignment`: the label pairs and their unit directions d (``pairs_``, ``directions_``, from the
  ``unembedding`` rows given at fit); ``score`` measures the new states along those fitted directions (their own
  class means, variances and singular vectors, which is what the measure is about). Nothing else is learnt from
  the states, so with the same rows ``score(H2, y2)`` equals a fit on (H2, y2).
* :class:`EffectiveDimension`: nothing beyond the width; ``score`` is the participation ratio of the new states.
* :class:`DenoisingGain`: the rank-``rank`` principal subspace and mean of the fit states (``subspace_``);
  ``score`` projects the new states onto it and returns the lens accuracy gain.

``score`` checks that the new data has the fitted width and no unseen classes. Errors are
:class:`geometry.MeasureError`, a ``ValueError`` as scikit-learn expects.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_is_fitted

from geometry import kernels, measures
from geometry.errors import MeasureError
from geometry.lens import Subspace, fit_subspace
from geometry.validation import check_fraction, check_int, check_labels, check_states, label_pairs, to_numpy

ALIGNMENT_KINDS = ("singular", "variance", "mean", "composite")


class _Measure(BaseEstimator):
    """Shared fit/score plumbing: subclasses define ``_check_params``, ``_fit`` and ``_score``."""

    #: Whether the measure reads class labels (``y``).
    uses_labels = True

    def _check_params(self) -> None:
        """Raise :class:`MeasureError` for a bad constructor parameter (checked at fit, as scikit-learn does)."""

    def _fit(self, H: np.ndarray, y: np.ndarray | None) -> tuple[float, dict[str, Any]]:
        """The measure of the fit data and what is learnt (fitted attribute name ending in ``_`` -> value)."""
        raise NotImplementedError

    def _score(self, H: np.ndarray, y: np.ndarray | None) -> float:
        """The score of new data with the fitted attributes."""
        raise NotImplementedError

    def _check_data(self, H: Any, y: Any, fitting: bool) -> tuple[np.ndarray, np.ndarray | None]:
        states = check_states(H)
        labels = check_labels(y, len(states), min_classes=2 if fitting else 1) if self.uses_labels else None
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
        """Learn from (H, y) (see the module docstring) and store the measure of (H, y) in ``value_``."""
        self._check_params()
        states, labels = self._check_data(H, y, fitting=True)
        self.n_features_in_ = states.shape[1]
        self.classes_ = np.unique(labels) if labels is not None else np.array([], dtype=np.int64)
        self.value_, extras = self._fit(states, labels)
        for name, value in extras.items():
            setattr(self, name, value)
        return self

    def score(self, H: Any, y: Any = None) -> float:
        """Score new data (H, y), e.g. another group's queries, with what ``fit`` learnt (no refitting)."""
        check_is_fitted(self, "value_")
        return float(self._score(*self._check_data(H, y, fitting=False)))


class Separability(_Measure):
    """Linear separability (:func:`geometry.separability`). ``fit`` trains the probe on all the fit data
    (``probe_``) and records the fit data's held-out accuracy in ``value_``; ``score`` is the probe's accuracy on
    the new states."""

    def __init__(self, seed: int = 0, test_size: float = 0.5, cv: int | None = None):
        self.seed = seed
        self.test_size = test_size
        self.cv = cv

    def _check_params(self) -> None:
        check_int(self.seed, "seed", 0)
        check_fraction(self.test_size, "test_size")
        if self.cv is not None:
            check_int(self.cv, "cv", 2)

    def _fit(self, H: np.ndarray, y: np.ndarray | None) -> tuple[float, dict[str, Any]]:
        value = measures.separability(H, y, seed=self.seed, test_size=self.test_size, cv=self.cv)
        with measures.probe_fitting():
            probe = measures.train_probe(H, y)
        return value, {"probe_": probe}

    def _score(self, H: np.ndarray, y: np.ndarray | None) -> float:
        return self.probe_.accuracy(H, y)


class Alignment(_Measure):
    """Alignment of class structure with the label words' unembedding rows (``kind``: singular, variance, mean or
    composite; ``normalize`` as in :func:`geometry.variance_alignment`; see :mod:`geometry.measures`). After fit:
    ``value_`` (pair average), ``pairs_``, ``pair_values_`` (one per pair) and ``directions_`` (the unit vectors d,
    one row per pair), which ``score`` uses for the new states."""

    def __init__(self, unembedding: Any = None, kind: str = "composite", normalize: bool = True):
        self.unembedding = unembedding
        self.kind = kind
        self.normalize = normalize

    def _check_params(self) -> None:
        if self.kind not in ALIGNMENT_KINDS:
            raise MeasureError(f"kind must be one of {', '.join(ALIGNMENT_KINDS)}, not {self.kind!r}")
        if self.unembedding is None:
            raise MeasureError("Alignment needs unembedding=U, the (classes, dim) label-word unembedding rows")

    def _fit(self, H: np.ndarray, y: np.ndarray | None) -> tuple[float, dict[str, Any]]:
        result = measures.alignment_by_pair(H, y, self.unembedding, normalize=self.normalize)
        per_pair = getattr(result, self.kind)
        extras = {"pairs_": result.pairs, "pair_values_": per_pair, "directions_": result.directions}
        return float(np.mean(per_pair)), extras

    def _score(self, H: np.ndarray, y: np.ndarray | None) -> float:
        present = set(label_pairs(np.unique(y)))
        chosen = [i for i, pair in enumerate(self.pairs_) if pair in present]
        if not chosen:
            raise MeasureError("y needs at least two of the fitted classes to score alignment")
        inputs = measures.AlignmentInputs(kernels.shift(H), y, [self.pairs_[i] for i in chosen],
                                          self.directions_[chosen])
        return float(np.mean(getattr(measures.pair_alignment(inputs, self.normalize), self.kind)))


class EffectiveDimension(_Measure):
    """Participation ratio of the centred states' singular values (:func:`geometry.effective_dimension`); nothing
    is learnt, so ``score`` is the measure of the new states."""

    uses_labels = False

    def _fit(self, H: np.ndarray, y: np.ndarray | None) -> tuple[float, dict[str, Any]]:
        return measures.effective_dimension(H), {}

    def _score(self, H: np.ndarray, y: np.ndarray | None) -> float:
        return measures.effective_dimension(H)


class DenoisingGain(_Measure):
    """Lens accuracy gain of the rank-``rank`` reconstruction (:func:`geometry.denoising_gain`). ``fit`` learns the
    principal subspace and mean of the fit states (``subspace_``) and records ``raw_accuracy_`` and
    ``denoised_accuracy_``; ``score`` projects the new states onto that subspace. ``lens_*``, ``center``,
    ``scale`` and ``softcap`` are the store's lens entries (see :func:`geometry.lens.store_lens`)."""

    def __init__(self, lens_unembed: Any = None, lens_bias: Any = None, rank: int = 10, center: bool = False,
                 scale: float = 1.0, softcap: float | None = None):
        self.lens_unembed = lens_unembed
        self.lens_bias = lens_bias
        self.rank = rank
        self.center = center
        self.scale = scale
        self.softcap = softcap

    def _check_params(self) -> None:
        check_int(self.rank, "rank", 1)
        if self.lens_unembed is None:
            raise MeasureError("DenoisingGain needs lens_unembed, the store's (classes, dim) lens rows")
        if self.lens_bias is not None and to_numpy(self.lens_bias).shape != (len(to_numpy(self.lens_unembed)),):
            raise MeasureError("lens_bias must have one entry per row of lens_unembed")

    def _hits(self, H: np.ndarray, y: np.ndarray, subspace: Subspace) -> tuple[np.ndarray, np.ndarray]:
        return measures.denoising_hits(H, y, self.lens_unembed, self.lens_bias, rank=self.rank, center=self.center,
                                       scale=self.scale, softcap=self.softcap, subspace=subspace)

    def _fit(self, H: np.ndarray, y: np.ndarray | None) -> tuple[float, dict[str, Any]]:
        subspace = fit_subspace(H, self.rank)
        raw, denoised = self._hits(H, y, subspace)
        extras = {"subspace_": subspace, "raw_accuracy_": float(raw.mean()),
                  "denoised_accuracy_": float(denoised.mean())}
        return extras["denoised_accuracy_"] - extras["raw_accuracy_"], extras

    def _score(self, H: np.ndarray, y: np.ndarray | None) -> float:
        raw, denoised = self._hits(H, y, self.subspace_)
        return float(denoised.mean() - raw.mean())
