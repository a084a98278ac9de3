"""The measures of [Y] (Yang et al., NeurIPS 2025) as pure functions of arrays: numpy or torch in, floats out.

Conventions. ``H`` (n, d) are query hidden states, ``y`` (n,) integer classes 0..m-1, ``U`` (m, d) the label
words' unembedding rows (row i for class i). Directional measures are computed for every pair (A, B) of the
classes present in ``y``, A the lower class index, on that pair's examples only, with d = (U_A - U_B) /
||U_A - U_B||, and averaged over pairs (the composite averages per-pair products). Mean alignment is therefore
positive when class A's states lie further along U_A - U_B than class B's: each class leans towards its own
label word. Swapping the labels of A and B flips the sign of mean (and composite) alignment only. Variance
alignment is a proportion of variance by default; ``normalize=False`` gives [Y]'s appendix form dᵀ(H̄ᵀH̄/n)d.
Separability (a multinomial probe), effective dimension and the lens measures use all examples at once.
Degenerate states (all queries identical, e.g. the embedding of the same last token) give NaN: undefined.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from geometry import kernels
from geometry.bootstrap import resample_indices
from geometry.errors import MeasureError
from geometry.lens import Subspace, fit_subspace, lens_logits
from geometry.validation import (check_fraction, check_int, check_labels, check_states, check_unembedding,
                                 label_pairs, to_numpy)


# --- separability -----------------------------------------------------------------------------------------------

@contextmanager
def probe_fitting() -> Iterator[None]:
    """What every probe fit runs under: scikit-learn's ConvergenceWarning silenced (on separable hidden states lbfgs
    often stops at its default 100 iterations while the weights still grow; the held-out accuracy is well defined
    regardless) and BLAS limited to one thread (the probe's matrices are small: on a 2-core CPU one 6-class fit on
    1,000 x 640 states took 37 ms single-threaded against 150-180 ms with OpenBLAS's two threads).

    Both settings are process-global; nesting this in worker threads under the same context in the calling thread
    is safe, since every level sets the same values.
    """
    from sklearn.exceptions import ConvergenceWarning
    from threadpoolctl import threadpool_limits

    with warnings.catch_warnings(), threadpool_limits(limits=1, user_api="blas"):
        warnings.simplefilter("ignore", ConvergenceWarning)
        yield


@dataclass(frozen=True)
class Probe:
    """A fitted linear probe: scikit-learn's default ``LogisticRegression`` on states shifted by ``centre``."""

    model: Any
    centre: np.ndarray

    def accuracy(self, H: np.ndarray, y: np.ndarray) -> float:
        """The probe's accuracy on states ``H`` with gold classes ``y``."""
        return float(self.model.score(H - self.centre, y))


def train_probe(H: np.ndarray, y: np.ndarray) -> Probe:
    """Fit the probe on (H, y), shifted by the mean of H (call it under :func:`probe_fitting`).

    The intercept is not penalised, so the shift leaves the optimal classifier unchanged; it only spares lbfgs the
    large common offset of hidden states, with which it stopped unconverged at its 100 iterations in 81% of the
    fits on Gemma 3 270M (19% after the shift, median 33 iterations, 1.7x faster).
    """
    from sklearn.linear_model import LogisticRegression

    centre = H.mean(axis=0)
    return Probe(LogisticRegression().fit(H - centre, y), centre)


def _fit_score(H: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray) -> float:
    """Held-out accuracy of the probe (:func:`train_probe`) fit on ``train``, scored on ``test``."""
    return train_probe(H[train], y[train]).accuracy(H[test], y[test])


def _check_split(y: np.ndarray, test_size: float, folds: int | None = None) -> None:
    """Refuse splits that would leave a class out of the training or held-out part."""
    counts = np.bincount(y)
    present = np.flatnonzero(counts)
    smallest = int(present[np.argmin(counts[present])])
    needed = folds or 2
    if counts[smallest] < needed:
        how = f"cv={folds} folds" if folds else "a training and a held-out half"
        raise MeasureError(
            f"separability needs at least {needed} examples of every class for {how}; class {smallest} has "
            f"{counts[smallest]} (n={len(y)}). Use more queries{' or a smaller cv' if folds else ''}"
        )
    n_test = int(np.ceil(test_size * len(y)))
    if not folds and min(n_test, len(y) - n_test) < len(present):
        raise MeasureError(
            f"n={len(y)} is too small for test_size={test_size}: each part needs at least one example of each of "
            f"the {len(present)} classes"
        )


def _split(y: np.ndarray, test_size: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A stratified random split of positions into a training and a held-out part."""
    from sklearn.model_selection import train_test_split

    return train_test_split(np.arange(len(y)), test_size=test_size, stratify=y, random_state=seed)


def separability(H: Any, y: Any, *, seed: int = 0, test_size: float = 0.5, cv: int | None = None) -> float:
    """Held-out accuracy of a logistic-regression probe: how linearly separable the classes' states are.

    Fits scikit-learn's ``LogisticRegression()`` (defaults; multinomial for m > 2; states shifted by the training
    mean, which leaves the optimum unchanged) on a stratified random ``1 - test_size`` share of the examples and
    scores accuracy on the rest; with ``cv=k`` returns the mean
    accuracy of stratified, shuffled k-fold cross-validation instead. ``seed`` fixes the split. A proxy (lower
    bound in expectation) for S*, the best accuracy of any hyperplane through the origin.
    """
    states = check_states(H)
    labels = check_labels(y, len(states))
    seed = check_int(seed, "seed", 0)
    test_size = check_fraction(test_size, "test_size")
    if cv is None:
        _check_split(labels, test_size)
        splits = [_split(labels, test_size, seed)]
    else:
        from sklearn.model_selection import StratifiedKFold

        folds = check_int(cv, "cv", 2)
        _check_split(labels, test_size, folds)
        splits = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(states, labels)
    with probe_fitting():
        return float(np.mean([_fit_score(states, labels, train, test) for train, test in splits]))


def separability_bootstrap(H: Any, y: Any, n_boot: int, *, seed: int = 0, test_size: float = 0.5) -> np.ndarray:
    """Separability of ``n_boot`` resamples: each draws a new stratified split, then bootstraps the training and
    held-out parts separately (within class), so no query is both fitted and scored. One probe fit per resample."""
    states = check_states(H)
    labels = check_labels(y, len(states))
    test_size = check_fraction(test_size, "test_size")
    _check_split(labels, test_size)
    rng = np.random.default_rng(seed)
    values = np.empty(check_int(n_boot, "n_boot", 0))
    with probe_fitting():
        for b in range(len(values)):
            train, test = _split(labels, test_size, int(rng.integers(2**31)))
            train = train[resample_indices(labels[train], rng)]
            test = test[resample_indices(labels[test], rng)]
            values[b] = _fit_score(states, labels, train, test)
    return values


# --- alignment --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PairAlignment:
    """Alignment measures of every label pair (A, B), A < B, in the order of ``pairs``."""

    pairs: list[tuple[int, int]]
    directions: np.ndarray  # (P, d) unit vectors (U_A - U_B) / ||U_A - U_B||
    singular: np.ndarray  # (P,)
    variance: np.ndarray
    mean: np.ndarray
    composite: np.ndarray


@dataclass(frozen=True)
class AlignmentInputs:
    """Validated, shifted states with the label pairs and their directions, ready for the kernels."""

    X: np.ndarray
    y: np.ndarray
    pairs: list[tuple[int, int]]
    directions: np.ndarray


def prepare_alignment(H: Any, y: Any, U: Any) -> AlignmentInputs:
    """Validate (H, y, U) and compute the pair directions once (shared by the measures and the sweep)."""
    states = check_states(H)
    labels = check_labels(y, len(states))
    classes = np.unique(labels)
    rows = check_unembedding(U, classes, states.shape[1])
    pairs = label_pairs(classes)
    return AlignmentInputs(kernels.shift(states), labels, pairs, kernels.pair_directions(rows, pairs))


def pair_alignment(inputs: AlignmentInputs, normalize: bool = True) -> PairAlignment:
    """Every alignment measure of every label pair of prepared inputs (see :func:`alignment_by_pair`)."""
    weights = kernels.unit_weights(len(inputs.y))
    directed = kernels.alignment_batch(inputs.X, inputs.y, inputs.directions, inputs.pairs, weights, normalize)
    singular = kernels.singular_alignment_batch(inputs.X, inputs.y, inputs.directions, inputs.pairs, weights, 2)
    return PairAlignment(inputs.pairs, inputs.directions, singular[0], directed["variance"][0],
                         directed["mean"][0], directed["composite"][0])


def alignment_by_pair(H: Any, y: Any, U: Any, *, normalize: bool = True) -> PairAlignment:
    """Singular, variance-based, mean-based and composite alignment of every label pair (see the module doc);
    ``normalize`` as in :func:`variance_alignment`."""
    return pair_alignment(prepare_alignment(H, y, U), normalize)


def singular_alignment(H: Any, y: Any, U: Any) -> float:
    """Max over the top-2 right singular vectors v of the pair's centred states of |cos(v, d)|, pair-averaged."""
    return float(np.mean(alignment_by_pair(H, y, U).singular))


def variance_alignment(H: Any, y: Any, U: Any, *, normalize: bool = True) -> float:
    """Share of the pair's total variance along d: dᵀH̄ᵀH̄d / tr(H̄ᵀH̄), pair-averaged (H̄: the pair's states,
    centred on their mean). With ``normalize=False``: dᵀ(H̄ᵀH̄ / n)d, the variance along d in the states' own
    units, as [Y]'s appendix writes it (its main text calls the measure a proportion of variance, the default)."""
    return float(np.mean(alignment_by_pair(H, y, U, normalize=normalize).variance))


def mean_alignment(H: Any, y: Any, U: Any) -> float:
    """dᵀ(μ_A - μ_B) over the pooled within-class s.d. of dᵀh (signed, A = lower class), pair-averaged."""
    return float(np.mean(alignment_by_pair(H, y, U).mean))


def composite_alignment(H: Any, y: Any, U: Any, *, normalize: bool = True) -> float:
    """Variance-based (``normalize`` as in :func:`variance_alignment`) times mean-based alignment per pair, then
    averaged over pairs."""
    return float(np.mean(alignment_by_pair(H, y, U, normalize=normalize).composite))


# --- effective dimension ----------------------------------------------------------------------------------------

def effective_dimension(H: Any) -> float:
    """Participation ratio (Σσ_i²)² / Σσ_i⁴ of the singular values of the centred states (1 .. min(n, d))."""
    states = check_states(H)
    return float(kernels.effective_dimension_batch(kernels.shift(states))[0])


# --- the logit lens -----------------------------------------------------------------------------------------------

def lens_hits(lens_top_token: Any, label: Any, label_token: Any) -> np.ndarray:
    """Per query: whether the logit lens's whole-vocabulary top-1 token is the gold label word's token."""
    top = to_numpy(lens_top_token)
    labels = check_labels(label, len(top), name="label", min_classes=1)
    tokens = to_numpy(label_token)
    if top.ndim != 1 or tokens.ndim != 1:
        raise MeasureError("lens_top_token and label_token must be 1-D (one layer's tokens; one token per class)")
    if labels.max() >= len(tokens):
        raise MeasureError(f"label_token has {len(tokens)} entries but the labels go up to class {labels.max()}")
    return top == tokens[labels]


def output_alignment(lens_top_token: Any, label: Any, label_token: Any) -> float:
    """Logit-lens accuracy of one layer: the share of queries whose lens top-1 token is the gold label token."""
    return float(lens_hits(lens_top_token, label, label_token).mean())


def denoising_hits(H: Any, y: Any, lens_unembed: Any, lens_bias: Any = None, *, rank: int = 10,
                   center: bool = False, scale: float = 1.0, softcap: float | None = None,
                   subspace: Subspace | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per query: label-restricted lens correctness of the raw states and of their rank-``rank`` reconstruction
    (onto ``subspace`` when given, e.g. one fitted on other states; else the states' own principal subspace)."""
    states = check_states(H)
    labels = check_labels(y, len(states), min_classes=1)
    rank = check_int(rank, "rank", 1)
    if labels.max() >= len(to_numpy(lens_unembed)):
        raise MeasureError(f"lens_unembed has {len(to_numpy(lens_unembed))} rows but the labels go up to class "
                           f"{labels.max()}")
    denoised = (subspace or fit_subspace(states, rank)).project(states)
    lens = dict(center=center, scale=scale, softcap=softcap)
    raw = lens_logits(states, lens_unembed, lens_bias, **lens).argmax(axis=1) == labels
    return raw, lens_logits(denoised, lens_unembed, lens_bias, **lens).argmax(axis=1) == labels


def denoising_gain(H: Any, y: Any, lens_unembed: Any, lens_bias: Any = None, *, rank: int = 10,
                   center: bool = False, scale: float = 1.0, softcap: float | None = None) -> float:
    """Label-restricted lens accuracy of the rank-``rank`` reconstruction (centred states, plus the mean) minus
    that of the raw states. ``lens_unembed``/``lens_bias``/``center``/``scale``/``softcap`` are the store's
    ``lens_*`` entries (see :mod:`geometry.lens`; :func:`geometry.lens.store_lens` reads them and refuses a store
    whose final-norm form is not exact), so the final norm and output scaling are applied as the model applies
    them. 0 when ``rank`` >= min(n, d).

    The paper scores the whole vocabulary; a store keeps only the label rows, so this gain is label-restricted.
    """
    raw, denoised = denoising_hits(H, y, lens_unembed, lens_bias, rank=rank, center=center, scale=scale,
                                   softcap=softcap)
    return float(denoised.mean() - raw.mean())
