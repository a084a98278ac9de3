import numpy as np
import pytest

from heads.errors import HeadsError
from heads.sweeps import logit_diff, sweep


def test_logit_diff_is_gold_minus_best_other():
    logits = np.array([[1.0, 3.0, 2.0], [5.0, 0.0, 1.0]])
    np.testing.assert_allclose(logit_diff(logits, np.array([2, 0])), [-1.0, 4.0])


def test_fast_sweep_equals_naive_loop(tiny):
    fast = sweep(tiny, shots=3, n=10, batch_size=4, progress=False)
    naive = sweep(tiny, shots=3, n=10, batch_size=3, method="naive", progress=False)
    arch = tiny.arch
    assert fast["logit_diff"].shape == (arch.n_layers, arch.n_heads)
    assert not np.isnan(fast["logit_diff"].values).any()
    np.testing.assert_allclose(fast["label_logits"].values, naive["label_logits"].values, atol=1e-4)
    np.testing.assert_allclose(fast["logit_diff"].values, naive["logit_diff"].values, atol=1e-4)
    np.testing.assert_array_equal(fast["accuracy"].values, naive["accuracy"].values)
    np.testing.assert_allclose(fast["clean_label_logits"].values, naive["clean_label_logits"].values, atol=1e-5)
    assert np.abs(fast["logit_diff"].values).max() > 1e-4


def test_sweep_of_a_subset(tiny_gemma):
    result = sweep(tiny_gemma, shots=2, n=4, heads=[(1, 2), (3, 0)], progress=False)
    swept = ~np.isnan(result["logit_diff"].values)
    assert swept.sum() == 2 and swept[1, 2] and swept[3, 0]
    accuracy = result["accuracy"].values[1, 2]
    assert accuracy == pytest.approx(result["accuracy_change"].values[1, 2] + result.attrs["clean_accuracy"])


def test_sweep_errors(tiny_gemma):
    with pytest.raises(HeadsError, match="unknown sweep method"):
        sweep(tiny_gemma, n=2, method="quick", progress=False)
    with pytest.raises(HeadsError, match="out of range"):
        sweep(tiny_gemma, n=2, heads=[(9, 0)], progress=False)
