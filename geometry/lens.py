"""The logit lens on label words, applied to arrays: final norm, then the label words' unembedding rows.

The store keeps the label rows already multiplied by the final norm's gain (``lens_unembed``), the offset its bias
adds (``lens_bias``) and whether the norm subtracts the mean (attr ``lens_center``), so the lens of any state
(a low-rank reconstruction, say) is ``normalise(h) @ lens_unembedᵀ + lens_bias`` with
``normalise(h) = (h - mean(h) if center else h) / RMS(...)``, as ``extraction.lens.logit_lens`` computes it
through the model. The model's own output scaling follows: the raw logits are multiplied by attr
``lens_logit_scale`` (1 when absent) and, where attr ``lens_softcap`` holds a number c, soft-capped as
``c * tanh(z / c)`` (Gemma 2's final-logit soft-capping). The norm's epsilon is not stored and is left out: for
residual states (RMS well above 1e-3) it changes logits by less than one part in a million. Only the label rows
are stored, so this lens is label-restricted; a whole-vocabulary lens of new states needs the model.

A store whose attr ``lens_form_exact`` is False holds a final norm that could not be written in this form; its
``lens_*`` arrays are placeholders (gain 1, bias 0), and :func:`store_lens` refuses it rather than compute a
wrong lens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from geometry.errors import MeasureError
from geometry.kernels import top_right_singular
from geometry.validation import check_states, to_numpy


def normalise(H: np.ndarray, center: bool = False) -> np.ndarray:
    """Rows divided by their root mean square (after subtracting each row's mean when ``center``)."""
    x = H - H.mean(axis=1, keepdims=True) if center else H
    return x / np.sqrt(np.mean(x * x, axis=1, keepdims=True))


def lens_logits(H: Any, lens_unembed: Any, lens_bias: Any = None, *, center: bool = False, scale: float = 1.0,
                softcap: float | None = None) -> np.ndarray:
    """Label-word logits (n, m) of states H (n, d) through the final norm and the gain-scaled label rows (m, d),
    then the model's output scaling: times ``scale``, then ``softcap * tanh(z / softcap)`` when ``softcap``."""
    states = check_states(H)
    rows = check_states(lens_unembed, "lens_unembed")
    logits = normalise(states, center) @ rows.T
    if lens_bias is not None:
        logits = logits + to_numpy(lens_bias).astype(np.float64)
    logits = logits * float(scale)
    return logits if softcap is None else float(softcap) * np.tanh(logits / float(softcap))


@dataclass(frozen=True)
class StoreLens:
    """A store group's label-restricted lens: the arguments of :func:`lens_logits` besides the states."""

    unembed: np.ndarray
    bias: np.ndarray | None
    center: bool
    scale: float = 1.0
    softcap: float | None = None

    def logits(self, H: Any) -> np.ndarray:
        return lens_logits(H, self.unembed, self.bias, center=self.center, scale=self.scale, softcap=self.softcap)


def lens_refusal(attrs: dict[str, Any], where: str = "this store") -> str | None:
    """Why the ``lens_*`` entries of a group with these attrs cannot serve as a lens (None: they can)."""
    if attrs.get("lens_form_exact", True) is False:
        return (f"{where} records lens_form_exact=False: the model's final norm has no gain/bias form, so its "
                "lens_* arrays are not the model's lens; measures that need it (denoising_gain) cannot be computed "
                "from the store (leave them out, or re-extract with a toolkit whose fit covers this norm)")
    return None


def store_lens(ds: Any, where: str = "this store") -> StoreLens:
    """The lens of a store group (an xarray Dataset with ``lens_unembed``, ``lens_bias`` and the ``lens_*``
    attrs), refusing a group whose final-norm form is not exact (see the module docstring)."""
    reason = lens_refusal(ds.attrs, where)
    if reason:
        raise MeasureError(reason)
    softcap = ds.attrs.get("lens_softcap")
    return StoreLens(np.asarray(ds["lens_unembed"].values, dtype=np.float64),
                     np.asarray(ds["lens_bias"].values, dtype=np.float64) if "lens_bias" in ds else None,
                     bool(ds.attrs.get("lens_center", False)), float(ds.attrs.get("lens_logit_scale", 1.0)),
                     None if softcap is None else float(softcap))


@dataclass(frozen=True)
class Subspace:
    """The mean of some states and the top right singular vectors (rows of ``basis``) of their centred form."""

    mean: np.ndarray
    basis: np.ndarray

    def project(self, H: np.ndarray) -> np.ndarray:
        """``mean`` plus the projection of ``H - mean`` onto the subspace (the denoised states)."""
        return self.mean + (H - self.mean) @ self.basis.T @ self.basis


def fit_subspace(H: np.ndarray, rank: int) -> Subspace:
    """The rank-``rank`` principal subspace of the states (centred by their mean)."""
    mean = H.mean(axis=0)
    return Subspace(mean, top_right_singular(H - mean, rank))

