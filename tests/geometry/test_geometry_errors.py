"""Bad inputs give a MeasureError (a project error and a ValueError) whose message says what is wrong."""

import numpy as np
import pytest

from extraction.errors import ICLGeometryError
from geometry import MeasureError
from geometry.measures import (composite_alignment, denoising_gain, effective_dimension, output_alignment,
                               separability, singular_alignment)

rng = np.random.default_rng(0)
H = rng.normal(size=(12, 5))
Y = np.arange(12) % 2
U = rng.normal(size=(2, 5))


def test_error_is_a_project_error_and_a_value_error():
    assert issubclass(MeasureError, ICLGeometryError) and issubclass(MeasureError, ValueError)


@pytest.mark.parametrize("call, message", [
    (lambda: composite_alignment(H, np.zeros(12, dtype=int), U),
     "at least 2 classes to measure separation; got only class 0"),
    (lambda: separability(H, np.ones(12, dtype=int)), "got only class 1"),
    (lambda: composite_alignment(H, Y[:10], U), "y has 10 entries but H has 12 rows"),
    (lambda: composite_alignment(H[:, :4], Y, U), "U has 5 columns but H has 4"),
    (lambda: composite_alignment(H, Y + 1, U), "U has 2 rows (one per class) but the labels go up to class 2"),
    (lambda: composite_alignment(H[0], Y, U), "H must be a 2-D array"),
    (lambda: composite_alignment(H, Y.astype(float), U), "integer class indices"),
    (lambda: composite_alignment(H, Y - 1, U), "class indices 0..m-1; got -1"),
    (lambda: singular_alignment(np.where(np.eye(12, 5) > 0, np.nan, H), Y, U), "H contains 5 NaN or infinite"),
    (lambda: effective_dimension(np.where(np.eye(12, 5) > 0, np.inf, H)), "first: row 0"),
    (lambda: composite_alignment(H, Y, np.vstack([U[0], U[0]])), "rows of classes 0 and 1 coincide"),
    (lambda: separability(H[:3], np.array([0, 0, 1])), "at least 2 examples of every class"),
    (lambda: separability(H[:4], np.array([0, 0, 1, 1]), test_size=0.1),
     "n=4 is too small for test_size=0.1"),
    (lambda: separability(H, Y, cv=7), "cv=7 folds; class 0 has 6"),
    (lambda: separability(H, Y, cv=1), "cv must be an integer >= 2"),
    (lambda: separability(H, Y, test_size=1.5), "test_size must be a number strictly between 0 and 1"),
    (lambda: denoising_gain(H, Y, U, rank=0), "rank must be an integer >= 1"),
    (lambda: denoising_gain(H, Y + 1, U), "lens_unembed has 2 rows but the labels go up to class 2"),
    (lambda: output_alignment([1, 2], [0, 2], [1, 2]), "label_token has 2 entries but the labels go up to class 2"),
])
def test_bad_inputs_raise_clear_errors(call, message):
    with pytest.raises(MeasureError) as info:
        call()
    assert message in str(info.value)
