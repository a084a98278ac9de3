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
so alignment to them is measured on the read-out's hidden layer relu(W1 h + b1) (the model's hook point
``readout.hidden``, which the run store keeps as ``readout_hidden``), against the rows of the same step (the read-out trains too): with d = (W2_A - W2_B) /
||W2_A - W2_B||, singular, variance-based, mean-based and composite alignment are exactly [Y]'s definitions with
W2's rows in the role of the unembedding rows E_y (the logit difference of labels A and B is d's projection up to
the bias). That hidden layer is reported as one more entry of the ``layer`` dim, after the last block's output,
with separability and effective dimension too. The ``site`` coordinate along ``layer`` names each entry:
``embedding``, ``after block b``, ``readout hidden``. Alignment is NaN at
the residual layers: W2's rows do not live there, and the MLP has no single direction per label in the residual
stream (its local direction changes with the ReLU pattern of each query).

**Linear read-out** ([S]'s, ``model.readout = "linear"``): logits = W_U^T n(h), with n the read-out's LayerNorm
(with ``pre_norm``; the identity without). W_U's columns, one per label, are the label unembeddings, directions
in the residual stream itself, so with ``readout="linear"`` alignment is measured at every residual layer against
them, exactly as [Y] does with a language model's unembedding rows (on the raw states, the final norm not
applied), and the extra ``layer`` entry, site ``readout input``, is the normalised query state n(h) the
unembedding reads (the run store's ``readout_input``), where d's projection is the logit difference exactly.

**Rare labels.** Separability splits the queries of every label into a training and a held-out part (stratified),
so a label needs at least two queries (``cv`` of them with ``cv``-fold cross-validation). A snapshot's labels are
not balanced (on a quick run, 256 queries over 16 labels had a label with one query), so queries whose label has
fewer than ``min_per_label`` (default: that minimum) are left out of every measure, per seed; ``n_examples``
(seed) and ``n_labels`` (seed) in the result say how many queries and labels were measured.

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
#: Per read-out kind: the site name of the extra ``layer`` entry (the values the read-out's rows act on).
READOUT_SITES = {"mlp": "readout hidden", "linear": "readout input"}
ALIGNMENT_TO = {
    "mlp": "rows of the read-out's last linear layer, on the read-out's hidden layer (site 'readout hidden'); "
           "NaN at residual layers",
    "linear": "the label unembeddings (rows of the linear read-out) at every residual layer and at the read-out's "
              "normalised input (site 'readout input')",
}


def _as_array(values: Any, dims: Sequence[str], what: str) -> xr.DataArray:
    """``values`` as a DataArray with exactly ``dims`` (numpy arrays take them in that order). Where ``unit`` (a
    read-out hidden unit) is expected, a DataArray's ``hidden`` or ``dim`` is taken as it."""
    if isinstance(values, xr.DataArray):
        for alias in ("hidden", "dim"):
            if "unit" in dims and alias in values.dims and alias not in dims and "unit" not in values.dims:
                values = values.rename({alias: "unit"})
        if set(values.dims) != set(dims):
            raise MeasureError(f"{what} must have dims {tuple(dims)}; got {values.dims}")
        return values.transpose(*dims)
    array = to_numpy(values)
    if array.ndim != len(dims):
        raise MeasureError(f"{what} must be a {len(dims)}-D array {tuple(dims)}; got shape {array.shape}")
    return xr.DataArray(array, dims=tuple(dims))


def _per_step(values: Any, dims: Sequence[str], n_steps: int, what: str) -> np.ndarray:
    """An array with a leading ``step`` dim, or without one (the same at every step: broadcast)."""
    with_step = ("step", *dims)
    named = isinstance(values, xr.DataArray) and "step" in values.dims
    array = _as_array(values, with_step if named or to_numpy(values).ndim == len(with_step) else dims, what).values
    array = array if array.ndim == len(with_step) else np.broadcast_to(array, (n_steps, *array.shape))
    if array.shape[0] != n_steps:
        raise MeasureError(f"{what} has {array.shape[0]} steps but the states have {n_steps}")
    return array


def _with_index(array: xr.DataArray, dim: str, values: Any = None) -> xr.DataArray:
    """Give ``dim`` a coordinate: ``values`` when given, the existing one, or 0..n-1."""
    if values is not None:
        return array.assign_coords({dim: to_numpy(values)})
    if dim not in array.coords:
        return array.assign_coords({dim: np.arange(array.sizes[dim])})
    return array


def _labels_per_seed(labels: Any, n_seed: int, n_example: int) -> np.ndarray:
    """The query labels as (seed, example): one row shared by every seed, or one row each."""
    array = to_numpy(labels.values if isinstance(labels, xr.DataArray) else labels)
    if array.ndim == 1:
        array = np.broadcast_to(array, (n_seed, len(array)))
    if array.shape != (n_seed, n_example):
        raise MeasureError(f"labels must be (example,) or (seed, example) = ({n_seed}, {n_example}); got "
                           f"{array.shape}")
    return array


def _common_labels(labels: np.ndarray, minimum: int) -> np.ndarray:
    """Which queries have a label with at least ``minimum`` queries (the rest cannot be split for the probe)."""
    values, counts = np.unique(labels, return_counts=True)
    return np.isin(labels, values[counts >= minimum])


def _group(hidden: np.ndarray, labels: np.ndarray, layers: Sequence[int], rows: np.ndarray | None) -> xr.Dataset:
    """One (step, seed)'s states as the in-memory group the sweep measures."""
    variables = {"hidden": (("layer", "example", "dim"), hidden), "label": ("example", labels)}
    if rows is not None:
        variables["unembed"] = (("class", "dim"), rows)
    return xr.Dataset(variables, coords={"layer": list(layers)})


def geometry_over_training(states: Any, labels: Any, *, readout_rows: Any = None,
                           readout_hidden_states: Any = None, measures: Sequence[str] = DEFAULT_MEASURES,
                           steps: Any = None, n_boot: int = 100, n_boot_separability: int = 0, seed: int = 0,
                           test_size: float = 0.5, cv: int | None = None,
                           min_per_label: int | None = None, readout: str = "mlp") -> xr.Dataset:
    """Every requested measure at every layer, stored step and seed: a Dataset with ``value``, ``ci_low`` and
    ``ci_high`` over (step, seed, layer, measure).

    ``states``: the query's residual states (step, seed, layer, example, dim) (a numpy array in that order, with
    ``steps`` naming its steps); ``labels``: the query's label, (example,) or (seed, example). With
    ``readout_rows``, the rows of the read-out's last linear layer (step, seed, class, unit) as the run store
    keeps them (or (seed, class, unit): the same at every step), and ``readout_hidden_states`` (step, seed,
    example, unit), the read-out's hidden layer (the run store's ``readout_hidden``), one more layer holds the
    read-out's hidden layer and the alignment measures are computed there (see the module doc). With
    ``readout="linear"`` the rows are the label unembeddings (step, seed, class, dim), alignment is measured at
    every layer, and ``readout_hidden_states`` is the read-out's normalised input (step, seed, example, dim). ``min_per_label``:
    see the module doc on rare labels. ``n_boot``,
    ``n_boot_separability``, ``seed``, ``test_size`` and ``cv`` are the sweep's (:func:`geometry.sweep.measure`).
    """
    chosen = tuple(measures)
    unknown = [m for m in chosen if m not in STATE_MEASURES + ALIGNMENT_MEASURES]
    if unknown:
        raise MeasureError(f"unknown measure {', '.join(map(repr, unknown))}; choose from "
                           f"{', '.join(STATE_MEASURES + ALIGNMENT_MEASURES)}")
    aligned = [m for m in chosen if m in ALIGNMENT_MEASURES]
    if readout not in READOUT_SITES:
        raise MeasureError(f"readout must be one of {', '.join(READOUT_SITES)}, got {readout!r}")
    linear, with_rows = readout == "linear", readout_rows is not None
    if with_rows != (readout_hidden_states is not None):
        raise MeasureError("pass both readout_rows and readout_hidden_states (the read-out's hidden layer), or "
                           "neither")
    if aligned and not with_rows:
        raise MeasureError(f"{', '.join(aligned)} need the read-out's rows and hidden layer: pass readout_rows= and "
                           "readout_hidden_states= (the run store's readout_hidden), or leave the alignment measures out")
    H = _with_index(_with_index(_as_array(states, STATE_DIMS, "states"), "step", steps), "seed")
    H = _with_index(H, "layer")
    n_steps, n_seeds, n_layers = H.sizes["step"], H.sizes["seed"], H.sizes["layer"]
    y = _labels_per_seed(labels, n_seeds, H.sizes["example"])
    minimum = max(2, cv or 2) if min_per_label is None else int(min_per_label)
    kept = [_common_labels(row, minimum) for row in y]
    residual_measures = list(chosen) if linear else [m for m in chosen if m in STATE_MEASURES]
    layers = [int(layer) for layer in H["layer"].values]
    sites = ["embedding"] + [f"after block {layer - 1}" for layer in layers[1:]]
    if with_rows:
        rows = _per_step(readout_rows, ("seed", "class", "unit"), n_steps, "readout_rows")
        inner = _as_array(readout_hidden_states, ("step", "seed", "example", "unit"), "readout_hidden_states").values
        if inner.shape[:3] != (n_steps, n_seeds, H.sizes["example"]) or rows.shape[1] != n_seeds or rows.shape[
                3] != inner.shape[3] or (linear and rows.shape[3] != H.sizes["dim"]):
            raise MeasureError(f"readout_hidden_states {inner.shape} and readout_rows {rows.shape} do not fit the "
                               f"states {tuple(H.shape)}: same steps, seeds and examples, and one hidden width "
                               "(a linear read-out's: the states' width)")
        layers, sites = layers + [layers[-1] + 1], sites + [READOUT_SITES[readout]]
    sweep = dict(n_boot=n_boot, n_boot_separability=n_boot_separability, seed=seed, test_size=test_size, cv=cv,
                 progress=False, parallel="serial")
    table = np.full((3, n_steps, n_seeds, len(layers), len(chosen)), np.nan)
    order = {name: j for j, name in enumerate(chosen)}
    values = H.values
    for t in range(n_steps):
        for s in range(n_seeds):
            parts = []
            if residual_measures:
                unembed = rows[t, s] if linear and with_rows else None
                group = _group(values[t, s][:, kept[s]], y[s][kept[s]], layers[:n_layers], unembed)
                parts.append((measure(group, "residual", residual_measures, **sweep), slice(0, n_layers)))
            if with_rows:
                group = _group(inner[t, s][None][:, kept[s]], y[s][kept[s]], [layers[-1]], rows[t, s])
                parts.append((measure(group, READOUT_SITES[readout], chosen, **sweep), slice(len(layers) - 1, None)))
            for result, where in parts:
                columns = [order[m] for m in result["measure"].values]
                for k, var in enumerate(("value", "ci_low", "ci_high")):
                    block = table[k, t, s, where]  # a view: (layer, measure)
                    block[:, columns] = result[var].values
    dims = ("step", "seed", "layer", "measure")
    return xr.Dataset(
        {**{name: (dims, table[k]) for k, name in enumerate(("value", "ci_low", "ci_high"))},
         "n_examples": ("seed", [int(keep.sum()) for keep in kept]),
         "n_labels": ("seed", [len(np.unique(row[keep])) for row, keep in zip(y, kept)])},
        coords={"step": H["step"].values, "seed": H["seed"].values, "layer": layers, "measure": list(chosen),
                "site": ("layer", sites)},
        attrs={"measures": list(chosen), "n_boot": int(n_boot), "n_boot_separability": int(n_boot_separability),
               "bootstrap_seed": int(seed), "test_size": float(test_size), "cv": "none" if cv is None else int(cv),
               "min_per_label": minimum,
               "alignment_to": ALIGNMENT_TO[readout] if with_rows else "none"},
    )


def run_geometry(snapshots: xr.Dataset, *, measures: Sequence[str] = DEFAULT_MEASURES, **options: Any) -> xr.Dataset:
    """:func:`geometry_over_training` of a run store's ``snapshots`` group (``open_run(out, "snapshots")``), at its
    completed steps (``done``): the query states, their labels, and the read-out's rows with the values they act
    on as stored (``readout_hidden`` for an MLP read-out, ``readout_input`` for a linear one, as the run's
    ``model.readout`` says). ``options`` are :func:`geometry_over_training`'s."""
    done = snapshots.isel(step=np.flatnonzero(snapshots["done"].values))
    if not done.sizes["step"]:
        raise MeasureError("the run has no completed snapshot yet; train it first")
    kind = snapshots.attrs.get("config", {}).get("model", {}).get("readout", "mlp")
    inner = done["readout_input" if kind == "linear" else "readout_hidden"]
    return geometry_over_training(done["hidden"], done["label"], readout_rows=done["readout_rows"],
                                  readout_hidden_states=inner, measures=measures, readout=kind, **options)
