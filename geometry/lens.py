"""The logit lens on label words, applied to arrays: final norm, then the label words' unembedding rows.

The store keeps the label rows already multiplied by the final norm's gain (``lens_unembed``), the offset its bias
adds (``lens_bias``) and whether the norm subtracts the mean (attr ``lens_center``), so the lens of any state
(a low-rank reconstruction, say) is ``normalise(h) @ lens_unembedᵀ + lens_bias`` with
``normalise(h) = (h - mean(h) if center else h) / RMS(...)``, as ``extraction.lens.logit_lens`` computes it
through the model. The norm's epsilon is not stored and is left out: for residual states (RMS well above 1e-3) it
changes logits by less than one part in a million. Only the label rows are stored, so this lens is
label-restricted; a whole-vocabulary lens of new states needs the model.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from geometry.kernels import top_right_singular
from geometry.validation import check_states, to_numpy


def normalise(H: np.ndarray, center: bool = False) -> np.ndarray:
    """Rows divided by their root mean square (after subtracting each row's mean when ``center``)."""
    x = H - H.mean(axis=1, keepdims=True) if center else H
    return x / np.sqrt(np.mean(x * x, axis=1, keepdims=True))


def lens_logits(H: Any, lens_unembed: Any, lens_bias: Any = None, *, center: bool = False) -> np.ndarray:
    """Label-word logits (n, m) of states H (n, d) through the final norm and the gain-scaled label rows (m, d)."""
    states = check_states(H)
    rows = check_states(lens_unembed, "lens_unembed")
    logits = normalise(states, center) @ rows.T
    return logits if lens_bias is None else logits + to_numpy(lens_bias).astype(np.float64)


def low_rank(H: np.ndarray, rank: int) -> np.ndarray:
    """Rank-``rank`` reconstruction of the centred states plus their mean (the denoised states)."""
    mean = H.mean(axis=0)
    centred = H - mean
    basis = top_right_singular(centred, rank)
    return mean + centred @ basis.T @ basis
