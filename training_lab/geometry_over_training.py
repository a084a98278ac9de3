"""[Y]'s geometry of the query states, measured at every stored training step of every seed.

The measures are the toolkit's own (:func:`geometry.sweep.measure`, the layer sweep with its stratified bootstrap
CIs, run on each (step, seed) as an in-memory group); nothing is re-implemented here. The classes are the query's
labels (its gold answer among the L labels).

**Where each measure is taken.** The run store keeps the query's residual state at every layer: layer 0 is the
embedding (the read-out-free model input), layer l the output of block l - 1. On these the lab measures
separability (a logistic probe's held-out accuracy on the query's label) and effective dimension.

Directional alignment needs class directions in the space of the states. [M]'s read-out is not an unembedding:
it is a two-layer ReLU MLP, logits = W2 relu(W1 h + b1) + b2, applied to the final residual state h. The rows of
its last linear layer W2 (one per label) are directions in the MLP's *hidden* space, not in the residual stream,
so alignment to them is measured on the read-out's hidden layer relu(W1 h + b1) (computed by
:func:`readout_hidden` from the first layer's weights, or given as stored): with d = (W2_A - W2_B) /
||W2_A - W2_B||, singular, variance-based, mean-based and composite alignment are exactly [Y]'s definitions with
W2's rows in the role of the unembedding rows E_y (the logit difference of labels A and B is d's projection up to
the bias). That hidden layer is reported as one more entry of the ``layer`` dim, after the last block's output,
with separability and effective dimension too. The ``site`` coordinate along ``layer`` names each entry:
``embedding``, ``after block b``, ``readout hidden``. Alignment is NaN at
the residual layers: W2's rows do not live there, and the MLP has no single direction per label in the residual
stream (its local direction changes with the ReLU pattern of each query).

**Cost and CIs.** One probe fit per (step, seed, layer); separability's CI needs ``n_boot_separability`` more
fits each (default 0: NaN CI). The other measures are bootstrapped cheaply (``n_boot`` resamples, 95% percentile
intervals over queries, stratified by label). Singular alignment solves an eigenproblem per label pair and
resample, so it is not in the default set; ask for it by name. Measured on this 2-core CPU for one (step, seed)
with 512 queries, L = 32 labels, width 128, three residual layers and the read-out's hidden layer, 100
resamples: the default set 1.3 s, singular alignment alone 3.5 s more.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import xarray as xr

from geometry.errors import MeasureError
from geometry.sweep import measure
from geometry.validation import to_numpy

#: The run store's dims of the query states, in order.
STATE_DIMS = ("step", "seed", "layer", "example", "dim")
#: Measures of the residual layers and of the read-out's hidden layer.
STATE_MEASURES = ("separability", "effective_dimension")
ALIGNMENT_MEASURES = ("singular_alignment", "variance_alignment", "mean_alignment", "composite_alignment")
#: The default set (singular alignment costs most; see the module doc).
DEFAULT_MEASURES = ("separability", "effective_dimension", "variance_alignment", "mean_alignment",
                    "composite_alignment")
READOUT_SITE = "readout hidden"


def _as_array(values: Any, dims: Sequence[str], what: str) -> xr.DataArray:
    """``values`` as a DataArray with exactly ``dims`` (numpy arrays take them in that order). Where ``hidden``
    is expected, a DataArray's ``dim`` (the run store's name for a vector axis) is taken as it."""
    if isinstance(values, xr.DataArray):
        if "hidden" in dims and "dim" in values.dims and "dim" not in dims:
            values = values.rename(dim="hidden")
        if set(values.dims) != set(dims):
            raise MeasureError(f"{what} must have dims {tuple(dims)}; got {values.dims}")
        return values.transpose(*dims)
    array = to_numpy(values)
    if array.ndim != len(dims):
        raise MeasureError(f"{what} must be a {len(dims)}-D array {tuple(dims)}; got shape {array.shape}")
    return xr.DataArray(array, dims=tuple(dims))


def _with_index(array: xr.DataArray, dim: str, values: Any = None) -> xr.DataArray:
    """Give ``dim`` a coordinate: ``values`` when given, the existing one, or 0..n-1."""
    if values is not None:
        return array.assign_coords({dim: to_numpy(values)})
    if dim not in array.coords:
        return array.assign_coords({dim: np.arange(array.sizes[dim])})
    return array


def readout_hidden(final_states: Any, weight: Any, bias: Any = None) -> xr.DataArray:
    """The read-out MLP's hidden layer relu(W1 h + b1) of the final residual states.

    ``final_states`` (step, seed, example, dim), ``weight`` W1 (seed, hidden, dim) as torch stores a linear layer,
    ``bias`` b1 (seed, hidden) or None. Returns (step, seed, example, hidden).
    """
    h = _as_array(final_states, ("step", "seed", "example", "dim"), "final_states")
    w = _as_array(weight, ("seed", "hidden", "dim"), "the read-out's first weight")
    if w.sizes["dim"] != h.sizes["dim"] or w.sizes["seed"] != h.sizes["seed"]:
        raise MeasureError(f"the read-out's first weight {dict(w.sizes)} does not fit the states {dict(h.sizes)}")
    pre = np.einsum("tsed,shd->tseh", h.values.astype(np.float64), w.values.astype(np.float64))
    if bias is not None:
        pre = pre + _as_array(bias, ("seed", "hidden"), "the read-out's first bias").values[None, :, None, :]
    coords = {d: h.coords[d] for d in ("step", "seed", "example") if d in h.coords}
    return xr.DataArray(np.maximum(pre, 0.0), dims=("step", "seed", "example", "hidden"), coords=coords)


def _labels_per_seed(labels: Any, n_seed: int, n_example: int) -> np.ndarray:
    """The query labels as (seed, example): one row shared by every seed, or one row each."""
    array = to_numpy(labels.values if isinstance(labels, xr.DataArray) else labels)
    if array.ndim == 1:
        array = np.broadcast_to(array, (n_seed, len(array)))
    if array.shape != (n_seed, n_example):
        raise MeasureError(f"labels must be (example,) or (seed, example) = ({n_seed}, {n_example}); got "
                           f"{array.shape}")
    return array


def _group(hidden: np.ndarray, labels: np.ndarray, layers: Sequence[int], rows: np.ndarray | None) -> xr.Dataset:
    """One (step, seed)'s states as the in-memory group the sweep measures."""
    variables = {"hidden": (("layer", "example", "dim"), hidden), "label": ("example", labels)}
    if rows is not None:
        variables["unembed"] = (("class", "dim"), rows)
    return xr.Dataset(variables, coords={"layer": list(layers)})


def geometry_over_training(states: Any, labels: Any, *, readout_rows: Any = None, hidden: Any = None,
                           measures: Sequence[str] = DEFAULT_MEASURES, steps: Any = None, n_boot: int = 100,
                           n_boot_separability: int = 0, seed: int = 0, test_size: float = 0.5,
                           cv: int | None = None) -> xr.Dataset:
    """Every requested measure at every layer, stored step and seed: a Dataset with ``value``, ``ci_low`` and
    ``ci_high`` over (step, seed, layer, measure).

    ``states``: the query's residual states (step, seed, layer, example, dim) (a numpy array in that order, with
    ``steps`` naming its steps); ``labels``: the query's label, (example,) or (seed, example). With
    ``readout_rows`` (seed, class, hidden), the rows of the read-out's last linear layer, and ``hidden`` (step,
    seed, example, hidden), the read-out's hidden layer (see :func:`readout_hidden`), one more layer holds the
    read-out's hidden layer and the alignment measures are computed there (see the module doc). ``n_boot``,
    ``n_boot_separability``, ``seed``, ``test_size`` and ``cv`` are the sweep's (:func:`geometry.sweep.measure`).
    """
    chosen = tuple(measures)
    unknown = [m for m in chosen if m not in STATE_MEASURES + ALIGNMENT_MEASURES]
    if unknown:
        raise MeasureError(f"unknown measure {', '.join(map(repr, unknown))}; choose from "
                           f"{', '.join(STATE_MEASURES + ALIGNMENT_MEASURES)}")
    aligned = [m for m in chosen if m in ALIGNMENT_MEASURES]
    if (readout_rows is None) != (hidden is None):
        raise MeasureError("pass both readout_rows and hidden (the read-out's hidden layer), or neither")
    if aligned and readout_rows is None:
        raise MeasureError(f"{', '.join(aligned)} need the read-out's rows and hidden layer: pass readout_rows= and "
                           "hidden= (see readout_hidden), or leave the alignment measures out")
    H = _with_index(_with_index(_as_array(states, STATE_DIMS, "states"), "step", steps), "seed")
    H = _with_index(H, "layer")
    y = _labels_per_seed(labels, H.sizes["seed"], H.sizes["example"])
    residual_measures = [m for m in chosen if m in STATE_MEASURES]
    layers = [int(layer) for layer in H["layer"].values]
    sites = ["embedding"] + [f"after block {layer - 1}" for layer in layers[1:]]
    if readout_rows is not None:
        rows = _as_array(readout_rows, ("seed", "class", "hidden"), "readout_rows").values
        inner = _as_array(hidden, ("step", "seed", "example", "hidden"), "hidden").values
        if inner.shape[:3] != (H.sizes["step"], H.sizes["seed"], H.sizes["example"]) or rows.shape[0] != H.sizes[
                "seed"] or rows.shape[2] != inner.shape[3]:
            raise MeasureError(f"hidden {inner.shape} and readout_rows {rows.shape} do not fit the states "
                               f"{tuple(H.shape)}: same steps, seeds and examples, and one hidden width")
        layers, sites = layers + [layers[-1] + 1], sites + [READOUT_SITE]
    sweep = dict(n_boot=n_boot, n_boot_separability=n_boot_separability, seed=seed, test_size=test_size, cv=cv,
                 progress=False, parallel="serial")
    table = np.full((3, H.sizes["step"], H.sizes["seed"], len(layers), len(chosen)), np.nan)
    order = {name: j for j, name in enumerate(chosen)}
    values = H.values
    for t in range(H.sizes["step"]):
        for s in range(H.sizes["seed"]):
            parts = []
            if residual_measures:
                group = _group(values[t, s], y[s], layers[:H.sizes["layer"]], None)
                parts.append((measure(group, "residual", residual_measures, **sweep), slice(0, H.sizes["layer"])))
            if readout_rows is not None:
                group = _group(inner[t, s][None], y[s], [layers[-1]], rows[s])
                parts.append((measure(group, READOUT_SITE, chosen, **sweep), slice(len(layers) - 1, None)))
            for result, where in parts:
                columns = [order[m] for m in result["measure"].values]
                for k, var in enumerate(("value", "ci_low", "ci_high")):
                    block = table[k, t, s, where]  # a view: (layer, measure)
                    block[:, columns] = result[var].values
    dims = ("step", "seed", "layer", "measure")
    return xr.Dataset(
        {name: (dims, table[k]) for k, name in enumerate(("value", "ci_low", "ci_high"))},
        coords={"step": H["step"].values, "seed": H["seed"].values, "layer": layers, "measure": list(chosen),
                "site": ("layer", sites)},
        attrs={"measures": list(chosen), "n_boot": int(n_boot), "n_boot_separability": int(n_boot_separability),
               "bootstrap_seed": int(seed), "test_size": float(test_size), "cv": "none" if cv is None else int(cv),
               "alignment_to": "rows of the read-out's last linear layer, on the read-out's hidden layer "
                               "(site 'readout hidden'); NaN at residual layers"},
    )
