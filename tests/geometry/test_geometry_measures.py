"""The pure measures: hand-computed values, known answers on synthetic data, invariances, and kernel exactness."""

import numpy as np
import pytest
import torch

from geometry import kernels
from geometry.bootstrap import resample_counts
from geometry.measures import (alignment_by_pair, composite_alignment, denoising_gain, effective_dimension,
                               mean_alignment, output_alignment, prepare_alignment, separability,
                               singular_alignment, variance_alignment)

# Four 2-D states, classes 0 0 1 1, label rows giving d = (1, 0). By hand (see test_hand_computed_values):
# projections on d: 2 4 | 0 0; centred states (column means 1.5, 0): (.5, 1) (2.5, -1) (-1.5, 1) (-1.5, -1).
H4 = np.array([[2.0, 1.0], [4.0, -1.0], [0.0, 1.0], [0.0, -1.0]])
Y4 = np.array([0, 0, 1, 1])
U4 = np.array([[1.0, 0.0], [-1.0, 0.0]])


def test_hand_computed_values():
    # mean: (3 - 0) / sqrt((2 * 1 + 2 * 0) / 4) = 3 sqrt(2)
    assert mean_alignment(H4, Y4, U4) == pytest.approx(3 * np.sqrt(2))
    # variance: sum of squared centred x = .25 + 6.25 + 2.25 + 2.25 = 11; total = 11 + 4 = 15
    assert variance_alignment(H4, Y4, U4) == pytest.approx(11 / 15)
    assert composite_alignment(H4, Y4, U4) == pytest.approx(11 / 15 * 3 * np.sqrt(2))
    # H̄ᵀH̄ = [[11, -2], [-2, 4]]: λ1 = (15 + sqrt(65)) / 2, v1 ∝ (1, (λ1 - 11) / -2); |cos(v1, d)| = |v1_x|
    lam1 = (15 + np.sqrt(65)) / 2
    assert singular_alignment(H4, Y4, U4) == pytest.approx(1 / np.sqrt(1 + ((lam1 - 11) / 2) ** 2))
    # participation ratio: (λ1 + λ2)² / (λ1² + λ2²) = 15² / (15² - 2 det) = 225 / (225 - 80)
    assert effective_dimension(H4) == pytest.approx(225 / 145)


def test_output_alignment_by_hand():
    # top tokens 5 7 5 9 against gold tokens 5 7 7 5: two hits of four
    assert output_alignment([5, 7, 5, 9], [0, 1, 1, 0], [5, 7]) == 0.5


def test_denoising_gain_by_hand():
    # h = μ + s a + n b with a ⟂ b, var(s) = 5 > var(n) = 1.25, s and n uncorrelated, μ on the decision boundary
    # x = y. The lens (identity rows) picks class 0 when x > y: (e1 - e2)·h = 1.155 s + 0.816 n, so the two
    # points with |s| = 1, |n| = 1.5 of opposite sign are misread (raw accuracy 6/8); the rank-1 reconstruction
    # μ + s a reads every point right: gain 2/8.
    a = np.array([1.0, -1.0, 1.0]) / np.sqrt(3)
    b = np.array([1.0, -1.0, -2.0]) / np.sqrt(6)
    s = np.array([1, 3, 1, 3, -1, -3, -1, -3.0])
    n = np.array([-1.5, 0.5, 1.5, -0.5, 1.5, -0.5, -1.5, 0.5])
    H = np.array([0.0, 0.0, 5.0]) + s[:, None] * a + n[:, None] * b
    y = (s < 0).astype(int)
    rows = np.eye(3)[:2]
    assert denoising_gain(H, y, rows, rank=1) == pytest.approx(0.25)
    assert denoising_gain(H, y, rows, rank=1, center=True) == pytest.approx(0.25)
    assert denoising_gain(H, y, rows, rank=3) == 0.0  # full rank reconstructs the states exactly


def test_separability_by_hand():
    separable = np.array([[0.0, 10.0]] * 4 + [[10.0, 0.0]] * 4)
    labels = np.array([0] * 4 + [1] * 4)
    assert separability(separable, labels) == 1.0
    assert separability(separable, labels, cv=2) == 1.0
    # identical states: the balanced training half gives equal probabilities, argmax picks class 0 -> 1/2
    assert separability(np.ones((8, 3)), labels) == 0.5


def clusters(rng, n=400, dim=20, classes=2, spread=0.3):
    centres = rng.normal(size=(classes, dim)) * 5
    y = np.arange(n) % classes
    return centres[y] + spread * rng.normal(size=(n, dim)), y


def pair_means(H, y, U):
    result = alignment_by_pair(H, y, U)
    return {k: float(getattr(result, k).mean()) for k in ("singular", "variance", "mean", "composite")}


def test_perfectly_separable_clusters_score_one():
    rng = np.random.default_rng(0)
    for classes in (2, 5):
        H, y = clusters(rng, classes=classes)
        assert separability(H, y) == 1.0
        assert separability(H, y, cv=5) == 1.0


def test_planted_along_d_is_aligned_and_orthogonal_is_not():
    rng = np.random.default_rng(1)
    dim, n = 30, 600
    U = rng.normal(size=(2, dim))
    d = (U[0] - U[1]) / np.linalg.norm(U[0] - U[1])
    # two more unit directions orthogonal to d and to each other: the class axis of the control, and a
    # within-class axis so that the second singular vector is well defined in both clouds
    basis = np.linalg.qr(np.column_stack([d, rng.normal(size=(dim, 2))]))[0].T
    orthogonal, within = basis[1], basis[2]
    y = np.arange(n) % 2
    sign = np.where(y == 0, 1.0, -1.0)[:, None]
    noise = 0.5 * rng.normal(size=(n, 1)) * within + 0.1 * rng.normal(size=(n, dim))
    along = pair_means(3 * sign * d + noise, y, U)
    across = pair_means(3 * sign * orthogonal + noise, y, U)
    assert along["singular"] > 0.99 and along["variance"] > 0.9 and along["mean"] > 20 and along["composite"] > 18
    assert across["singular"] < 0.1 and across["variance"] < 0.01
    assert abs(across["mean"]) < 0.3 and abs(across["composite"]) < 0.01


def test_effective_dimension_of_isotropic_and_low_rank_clouds():
    rng = np.random.default_rng(2)
    isotropic = rng.normal(size=(4000, 10))
    assert effective_dimension(isotropic) == pytest.approx(10, rel=0.05)
    low_rank = rng.normal(size=(4000, 2)) @ np.linalg.qr(rng.normal(size=(50, 2)))[0].T
    assert effective_dimension(low_rank) == pytest.approx(2, rel=0.05)
    assert np.isnan(effective_dimension(np.full((5, 3), 7.3)))  # identical states: undefined


def test_multiclass_averages_pairs_and_composite_averages_products():
    rng = np.random.default_rng(3)
    H, y = clusters(rng, n=90, dim=8, classes=3, spread=2.0)
    U = rng.normal(size=(3, 8))
    result = alignment_by_pair(H, y, U)
    assert result.pairs == [(0, 1), (0, 2), (1, 2)]
    for k, (a, b) in enumerate(result.pairs):
        rows = (y == a) | (y == b)
        assert result.mean[k] == pytest.approx(mean_alignment(H[rows], y[rows], U))
    assert composite_alignment(H, y, U) == pytest.approx(np.mean(result.variance * result.mean))
    assert composite_alignment(H, y, U) != pytest.approx(np.mean(result.variance) * np.mean(result.mean))


def test_invariances():
    rng = np.random.default_rng(4)
    H, y = clusters(rng, n=120, dim=12, classes=3, spread=3.0)
    U = rng.normal(size=(3, 12))
    base = pair_means(H, y, U)
    order = rng.permutation(len(y))
    for key, value in pair_means(H[order], y[order], U).items():
        assert value == pytest.approx(base[key])
    for key, value in pair_means(7.5 * H + 3.0, y, U).items():
        assert value == pytest.approx(base[key])
    assert effective_dimension(H[order]) == pytest.approx(effective_dimension(H))
    assert effective_dimension(-4 * H + 1) == pytest.approx(effective_dimension(H))
    # the lens normalises each state by its RMS, so denoising is unchanged by scaling too
    gain = denoising_gain(H, y, U, rank=2)
    assert denoising_gain(H[order], y[order], U, rank=2) == gain == denoising_gain(3.0 * H, y, U, rank=2)
    tokens = rng.integers(0, 5, size=len(y))
    assert output_alignment(tokens[order], y[order], [0, 1, 2]) == output_alignment(tokens, y, [0, 1, 2])


def test_swapping_two_classes_flips_only_the_sign_of_mean_alignment():
    rng = np.random.default_rng(5)
    H, y = clusters(rng, n=100, dim=10, spread=3.0)
    U = rng.normal(size=(2, 10))
    swapped = 1 - y
    base, flipped = pair_means(H, y, U), pair_means(H, swapped, U)
    assert flipped["mean"] == pytest.approx(-base["mean"])
    assert flipped["composite"] == pytest.approx(-base["composite"])  # variance x mean
    assert flipped["variance"] == pytest.approx(base["variance"])
    assert flipped["singular"] == pytest.approx(base["singular"])
    assert separability(H, swapped) == separability(H, y)
    # relabelling consistently (labels and label rows) changes nothing
    assert pair_means(H, swapped, U[::-1]) == pytest.approx(base)


def test_torch_tensors_are_accepted():
    H, y = torch.tensor(H4, dtype=torch.bfloat16), torch.tensor(Y4)
    assert mean_alignment(H, y, torch.tensor(U4)) == pytest.approx(3 * np.sqrt(2))
    assert effective_dimension(torch.tensor(H4, dtype=torch.float32)) == pytest.approx(225 / 145)


def test_weighted_kernels_equal_the_measures_of_stacked_resamples():
    """A row of bootstrap counts gives exactly the measure of the resample (singular: once the Ritz subspace
    reaches the rank), so the vectorised bootstrap is the measure, not an approximation of it."""
    rng = np.random.default_rng(6)
    H, y = clusters(rng, n=60, dim=9, classes=3, spread=3.0)
    U = rng.normal(size=(3, 9))
    counts = resample_counts(y, 4, rng)
    inputs = prepare_alignment(H, y, U)
    args = (inputs.X, inputs.y, inputs.directions, inputs.pairs, counts)
    directed = kernels.alignment_batch(*args)
    singular = kernels.singular_alignment_batch(*args, subspace=9)
    dims = kernels.effective_dimension_batch(inputs.X, counts)
    for b, row in enumerate(counts):
        rows = np.repeat(np.arange(len(y)), row.astype(int))
        expected = alignment_by_pair(H[rows], y[rows], U)
        np.testing.assert_allclose(directed["mean"][b], expected.mean, rtol=1e-9)
        np.testing.assert_allclose(directed["variance"][b], expected.variance, rtol=1e-9)
        np.testing.assert_allclose(singular[b], expected.singular, rtol=1e-9)
        assert dims[b] == pytest.approx(effective_dimension(H[rows]), rel=1e-9)


def test_separability_is_invariant_to_shifting_every_state():
    """The probe's intercept is not penalised, so a common offset (hidden states carry large ones in a few
    dimensions) cannot change the fitted classifier; the solver must reach the same answer from both origins."""
    rng = np.random.default_rng(3)
    n, dim, classes = 64, 100, 3
    y = np.arange(n) % classes
    H = 0.1 * rng.normal(size=(classes, dim))[y] + rng.normal(size=(n, dim))  # weakly separated classes
    offset = np.zeros(dim)
    offset[:3] = [400, -250, 150]
    for seed in range(4):
        assert separability(H + offset, y, seed=seed) == separability(H, y, seed=seed)
