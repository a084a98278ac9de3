"""Training phases from the accuracy curve, and the circuit of each phase from the attention metrics ([M]).

**Boundaries.** [M] puts a phase boundary at every step t where the accuracy rises by more than a threshold over
the next w steps: Acc(t + w) - Acc(t) > threshold, with w = 100 steps and threshold = 0.025 (both parameters
here). The rule is judged at the evaluated steps t only, which may be irregular (log-spaced early, regular later),
so Acc(t + w) must be defined between evaluations; ``method`` chooses how:

- ``"interpolate"`` (default): linear interpolation of the accuracy in the step between the evaluations on
  either side of t + w. The rule then measures a rate of rise and is exact when evaluations are at most w steps
  apart; where they are sparser an abrupt jump between two evaluations is spread over the gap and may be missed.
- ``"next"``: the accuracy at the first evaluated step at or after t + w. Identical to the rule where evaluations
  are at most w steps apart; where they are sparser it compares an evaluation with the next one, so it catches an
  abrupt jump inside the gap, but also counts a slow drift over a long gap as a boundary.

A step t with t + w beyond the last evaluation cannot be judged and is never a boundary.

**Noise.** The threshold is small: a held-out accuracy measured on n queries has a sampling s.d. of about
sqrt(a(1 - a)/n) (0.022 at a = 0.5, n = 512), and the difference of two such evaluations then exceeds 0.025 by
chance often, giving spurious boundaries on a flat curve. On a synthetic two-rise curve evaluated every 10 steps,
Gaussian noise of s.d. 0.01 gave about 25 transitions instead of 2. A fixed evaluation set removes the
query-sampling part of that noise (the same queries at every step), and ``smooth`` (an odd number of evaluations,
default 1: off, as [M]) applies the rule to a centred moving average of the curve (the window shrinks at the
ends): 5 evaluations recovered the 2 transitions at s.d. 0.01, 15 at s.d. 0.02. Smoothing starts a transition
up to about half its window earlier.

**Transitions.** Consecutive boundary steps (adjacent in the list of evaluated steps) merge into one transition
(start, end): start is its first boundary step; end is the first evaluated step at or after its last boundary
step + w (the rise detected at the last boundary step is complete there), or the last evaluated step. Transitions
whose spans overlap (a boundary step before the previous transition's end) merge too.

**Phases.** Phase 0 runs from the first evaluation; phase p begins at the end of transition p. Every evaluated
step gets the number of the phase it is in (the number of transitions that ended at or before it) and a flag
``in_transition`` (start <= step < end of some transition); a step inside a transition counts with the phase
before it.

**Circuits.** [M] names three circuits, in the order they appear: "bigram" (both layers' query attends to
itself), "label attention" (layer 1's query attends to the context's labels) and "chunk example" (layer 1's
label tokens attend to their items while layer 2's query attends to the labels). In 0-based block indices
(layer 1 = block 0, layer 2 = block 1) and the metrics of :mod:`training_lab.circuits`, the rules are, checked in
this order (the first that holds names the circuit; none holding gives ``"none"``):

1. ``chunk_example``: block 0's chunk-example >= ``chunk_threshold`` and block 1's label attention >=
   ``label_threshold`` (needs two blocks);
2. ``label_attention``: block 0's label attention >= ``label_threshold``;
3. ``bigram``: in every block the query's attention on itself (bigram) exceeds both its total attention on the
   labels and its total attention on the items, i.e. bigram dominates the query's attention.

Defaults: ``label_threshold`` = ``chunk_threshold`` = 0.6. For reference, uniform causal attention over N = 4
pairs gives bigram 1/9, label attention 4/9 and chunk example 0.26, below both thresholds.

**Circuits of phases.** A phase's circuit is judged on the metrics averaged over its measured steps outside
transitions, per seed. A circuit can form without its metrics reaching the thresholds: in [M]'s setting trained
here, block 0's label attention rose from 0.03 to 0.32 when the accuracy rose from 0.34 to 0.58, and in the next
phase block 0's chunk example rose by 0.16 and block 1's label attention by 0.24, all below 0.6. So from the second
measured phase on, a signature also holds when every metric it names rose by at least ``rise`` (default 0.1) over
the previous measured phase (chunk example: block 0's chunk example and block 1's label attention; label attention:
block 0's label attention); the bigram rule stays absolute. Circuits are cumulative: a phase is named by the most
advanced circuit (bigram < label attention < chunk example) that holds there or named the phase before, so a phase
in which nothing new rises (the accuracy creeping to 1, or a metric relaxing) keeps its predecessor's name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import xarray as xr

from geometry.errors import MeasureError
from geometry.validation import to_numpy
from training_lab.circuits import query_shares, single_head

METHODS = ("interpolate", "next")
#: The circuit names, in the order [M] finds them, then the name for none of them.
CIRCUITS = ("bigram", "label_attention", "chunk_example")
NO_CIRCUIT = "none"
#: The circuit of a phase with no measured step outside transitions.
UNMEASURED = "unmeasured"


@dataclass(frozen=True)
class Transition:
    """A span of rising accuracy, from its first boundary step to the step where the rise is complete."""

    start: int
    end: int


# --- boundaries and transitions of one curve ------------------------------------------------------------------------

def check_curve(steps: Any, accuracy: Any) -> tuple[np.ndarray, np.ndarray]:
    """Evaluated steps (strictly increasing integers) and a finite accuracy curve of the same length."""
    steps = to_numpy(steps)
    accuracy = to_numpy(accuracy).astype(np.float64)
    if steps.ndim != 1 or accuracy.shape != steps.shape:
        raise MeasureError(f"steps and accuracy must be 1-D and of one length; got {steps.shape} and {accuracy.shape}")
    if len(steps) and not (np.diff(steps) > 0).all():
        raise MeasureError("evaluation steps must be strictly increasing; sort the curve and drop repeated steps")
    if not np.isfinite(accuracy).all():
        raise MeasureError("the accuracy curve has NaN or infinite values; drop those evaluations first")
    return steps.astype(np.int64), accuracy


def smoothed(accuracy: np.ndarray, smooth: int) -> np.ndarray:
    """Centred moving average over ``smooth`` (odd) evaluations; the window shrinks at the ends."""
    if isinstance(smooth, bool) or not isinstance(smooth, (int, np.integer)) or smooth < 1 or smooth % 2 == 0:
        raise MeasureError(f"smooth must be an odd number of evaluations >= 1 (1: no smoothing); got {smooth!r}")
    kernel = np.ones(smooth)
    return np.convolve(accuracy, kernel, "same") / np.convolve(np.ones(len(accuracy)), kernel, "same")


def accuracy_ahead(steps: np.ndarray, accuracy: np.ndarray, window: int, method: str = "interpolate") -> np.ndarray:
    """Acc(t + window) at every evaluated step t (see the module doc for ``method``); NaN past the last evaluation."""
    if method not in METHODS:
        raise MeasureError(f"method must be one of {', '.join(METHODS)}, not {method!r}")
    target = steps + window
    judged = target <= (steps[-1] if len(steps) else -1)
    ahead = np.full(len(steps), np.nan)
    if method == "interpolate":
        ahead[judged] = np.interp(target[judged], steps, accuracy)
    else:
        ahead[judged] = accuracy[np.searchsorted(steps, target[judged], side="left")]
    return ahead


def rises(steps: Any, accuracy: Any, *, window: int = 100, method: str = "interpolate",
          smooth: int = 1) -> np.ndarray:
    """Acc(t + window) - Acc(t) at every evaluated step t of the (smoothed) curve; NaN where it cannot be judged."""
    steps, accuracy = check_curve(steps, accuracy)
    curve = smoothed(accuracy, smooth)
    return accuracy_ahead(steps, curve, window, method) - curve


def boundary_mask(steps: Any, accuracy: Any, *, window: int = 100, threshold: float = 0.025,
                  method: str = "interpolate", smooth: int = 1) -> np.ndarray:
    """Per evaluated step t: whether Acc(t + window) - Acc(t) > threshold (False where it cannot be judged)."""
    _check_rule(window, threshold)
    rise = rises(steps, accuracy, window=window, method=method, smooth=smooth)
    return np.nan_to_num(rise, nan=-np.inf) > threshold


def transitions(steps: Any, mask: Any, window: int) -> list[Transition]:
    """Merge the boundary steps (``mask``) into transitions (see the module doc)."""
    steps = to_numpy(steps).astype(np.int64)
    mask = to_numpy(mask).astype(bool)
    found: list[Transition] = []
    flagged = np.flatnonzero(mask)
    runs = np.split(flagged, np.flatnonzero(np.diff(flagged) > 1) + 1) if len(flagged) else []
    for run in runs:
        start = int(steps[run[0]])
        after = np.searchsorted(steps, steps[run[-1]] + window, side="left")
        end = int(steps[min(after, len(steps) - 1)])
        if found and start < found[-1].end:
            found[-1] = Transition(found[-1].start, max(end, found[-1].end))
        else:
            found.append(Transition(start, end))
    return found


def locate(steps: Any, found: Sequence[Transition]) -> tuple[np.ndarray, np.ndarray]:
    """The phase of each step (transitions ended at or before it) and whether it lies inside a transition."""
    steps = to_numpy(steps).astype(np.int64)
    starts = np.array([t.start for t in found], dtype=np.int64)
    ends = np.array([t.end for t in found], dtype=np.int64)
    phase = (ends[None, :] <= steps[:, None]).sum(axis=1)
    inside = ((starts[None, :] <= steps[:, None]) & (steps[:, None] < ends[None, :])).any(axis=1)
    return phase, inside


def _check_rule(window: Any, threshold: Any) -> None:
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
        raise MeasureError(f"window must be a whole number of steps >= 1; got {window!r}")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.floating)) or not threshold >= 0:
        raise MeasureError(f"threshold must be a number >= 0; got {threshold!r}")


# --- phases over seeds ----------------------------------------------------------------------------------------------

def as_curves(curves: Any, steps: Any = None) -> xr.DataArray:
    """Curves as a DataArray (step, seed): a DataArray with a ``step`` dim (a ``seed`` dim is added when absent),
    or a numpy array (step,) or (step, seed) with its ``steps`` given."""
    if isinstance(curves, xr.DataArray):
        if "step" not in curves.dims or set(curves.dims) - {"step", "seed"}:
            raise MeasureError(f"curves must have dims (step,) or (step, seed); got {curves.dims}")
        if steps is not None:
            curves = curves.assign_coords(step=to_numpy(steps))
        elif "step" not in curves.coords:
            raise MeasureError("the curves' step dim has no coordinate; pass steps=")
        curves = curves if "seed" in curves.dims else curves.expand_dims(seed=[0], axis=1)
        if "seed" not in curves.coords:
            curves = curves.assign_coords(seed=np.arange(curves.sizes["seed"]))
        return curves.transpose("step", "seed")
    values = to_numpy(curves)
    if steps is None:
        raise MeasureError("pass the evaluated steps (steps=) with a numpy accuracy curve")
    if values.ndim == 1:
        values = values[:, None]
    if values.ndim != 2:
        raise MeasureError(f"a numpy curve must be (step,) or (step, seed); got shape {values.shape}")
    if len(to_numpy(steps)) != len(values):
        raise MeasureError(f"steps and accuracy must be of one length along step; got {len(to_numpy(steps))} "
                           f"steps for {len(values)} evaluations")
    return xr.DataArray(values, dims=("step", "seed"),
                        coords={"step": to_numpy(steps), "seed": np.arange(values.shape[1])})


def detect_phases(accuracy: Any, steps: Any = None, *, window: int = 100, threshold: float = 0.025,
                  method: str = "interpolate", smooth: int = 1) -> xr.Dataset:
    """Boundaries, transitions and the phase of every evaluated step, per seed (see the module doc).

    ``accuracy`` is a DataArray (step[, seed]) or a numpy array with ``steps``; ``smooth`` as in the module doc.
    Returns a Dataset with, over
    (step, seed): ``accuracy``, ``rise`` (Acc(t + window) - Acc(t), NaN where it cannot be judged),
    ``boundary``, ``phase`` and ``in_transition``; over (seed, transition): ``transition_start`` and
    ``transition_end`` (NaN past a seed's last transition); ``n_transitions`` (seed). The attrs record the rule.
    """
    curves = as_curves(accuracy, steps)
    _check_rule(window, threshold)
    step_values = curves["step"].values
    shape = curves.shape
    rise, boundary = np.full(shape, np.nan), np.zeros(shape, bool)
    phase, inside = np.zeros(shape, np.int64), np.zeros(shape, bool)
    spans: list[list[Transition]] = []
    for j in range(shape[1]):
        rise[:, j] = rises(step_values, curves.values[:, j], window=window, method=method, smooth=smooth)
        boundary[:, j] = np.nan_to_num(rise[:, j], nan=-np.inf) > threshold
        spans.append(transitions(step_values, boundary[:, j], window))
        phase[:, j], inside[:, j] = locate(step_values, spans[-1])
    width = max((len(found) for found in spans), default=0)
    starts, ends = np.full((shape[1], width), np.nan), np.full((shape[1], width), np.nan)
    for j, found in enumerate(spans):
        starts[j, :len(found)] = [t.start for t in found]
        ends[j, :len(found)] = [t.end for t in found]
    grid = ("step", "seed")
    return xr.Dataset(
        {"accuracy": curves.astype(np.float64), "rise": (grid, rise), "boundary": (grid, boundary),
         "phase": (grid, phase), "in_transition": (grid, inside),
         "transition_start": (("seed", "transition"), starts), "transition_end": (("seed", "transition"), ends),
         "n_transitions": ("seed", np.array([len(found) for found in spans]))},
        coords={"step": step_values, "seed": curves["seed"].values, "transition": np.arange(width)},
        attrs={"window": int(window), "threshold": float(threshold), "method": method, "smooth": int(smooth),
               "rule": "boundary where Acc(t + window) - Acc(t) > threshold"},
    )


def seed_transitions(phases: xr.Dataset, seed: Any) -> list[Transition]:
    """One seed's transitions from :func:`detect_phases`'s result."""
    row = phases.sel(seed=seed)
    n = int(row["n_transitions"])
    return [Transition(int(a), int(b)) for a, b in zip(row["transition_start"].values[:n],
                                                       row["transition_end"].values[:n])]


def phase_starts(phases: xr.Dataset, seed: Any) -> list[int]:
    """The first evaluated step of each phase of one seed (phase 0 starts at the first evaluation)."""
    return [int(phases["step"].values[0])] + [t.end for t in seed_transitions(phases, seed)]


# --- circuits -------------------------------------------------------------------------------------------------------

def classify_circuit(metrics: xr.Dataset, *, label_threshold: float = 0.6,
                     chunk_threshold: float = 0.6) -> xr.DataArray:
    """The circuit named by the rules of the module doc, for every entry of ``metrics`` (the Dataset of
    :func:`training_lab.circuits.circuit_metrics`, with a ``block`` dim and at most one head); the result drops
    ``block`` (and ``head``)."""
    metrics = single_head(metrics)
    if "block" not in metrics.dims:
        raise MeasureError(f"the circuit metrics need a block dim; they have {tuple(metrics.dims)}")
    first = metrics.isel(block=0, drop=True)
    shares = query_shares(metrics)
    bigram = ((shares["self"] > shares["labels"]) & (shares["self"] > shares["items"])).all("block")
    label = first["label_attention"] >= label_threshold
    if metrics.sizes["block"] > 1:
        second = metrics.isel(block=1, drop=True)
        chunk = (first["chunk_example"] >= chunk_threshold) & (second["label_attention"] >= label_threshold)
    else:
        chunk = xr.zeros_like(label, dtype=bool)
    names = xr.where(chunk, CIRCUITS[2], xr.where(label, CIRCUITS[1], xr.where(bigram, CIRCUITS[0], NO_CIRCUIT)))
    return names.astype(object).rename("circuit")


def _rose(metrics: xr.Dataset, rise: float) -> xr.Dataset:
    """Per (seed, phase): whether each signature's metrics all rose by ``rise`` over the previous phase along
    ``phase`` (the phases given, in order; the first phase has no predecessor and nothing rose)."""
    first = metrics.isel(block=0, drop=True)
    gain = lambda metric: metric.diff("phase", label="upper").reindex(phase=metric["phase"]) >= rise  # noqa: E731
    label = gain(first["label_attention"])
    chunk = gain(first["chunk_example"]) & (gain(metrics.isel(block=1, drop=True)["label_attention"])
                                            if metrics.sizes["block"] > 1 else False)
    return xr.Dataset({CIRCUITS[1]: label, CIRCUITS[2]: chunk})


def _cumulative_names(absolute: np.ndarray, rose: xr.Dataset) -> list[str]:
    """One seed's phase names from the absolute rule's names and the rises (see the module doc)."""
    rank = {NO_CIRCUIT: 0, **{name: i + 1 for i, name in enumerate(CIRCUITS)}}
    names, held = [], NO_CIRCUIT
    for p, name in enumerate(absolute):
        for candidate in (CIRCUITS[2], CIRCUITS[1]):
            if bool(rose[candidate].values[p]) and rank[candidate] > rank[name]:
                name = candidate
                break
        held = max(held, str(name), key=rank.__getitem__)
        names.append(held)
    return names


def phase_circuits(metrics: xr.Dataset, phases: xr.Dataset, *, label_threshold: float = 0.6,
                   chunk_threshold: float = 0.6, rise: float = 0.1) -> xr.Dataset:
    """The circuit of every phase of every seed: the rules and rises of the module doc on the phases' mean metrics.

    ``metrics`` (step, seed, block) may be measured at other steps than the accuracy; each measured step is placed
    in its seed's phases by :func:`locate`, and steps inside transitions are left out of the mean. Returns, over
    (seed, phase): ``circuit`` (:data:`UNMEASURED` for a phase without measured steps, "" past a seed's last phase),
    ``n_steps`` and ``phase_start``; and the mean metrics over (seed, phase, block).
    """
    if isinstance(rise, bool) or not isinstance(rise, (int, float, np.floating)) or not rise > 0:
        raise MeasureError(f"rise must be a number > 0 (the metrics' rise that names a new circuit); got {rise!r}")
    metrics = single_head(metrics)
    missing = [d for d in ("step", "seed", "block") if d not in metrics.dims]
    if missing:
        raise MeasureError(f"the circuit metrics lack the dims {missing}; compute them per step, seed and block")
    seeds = metrics["seed"].values
    absent = [s for s in seeds if s not in phases["seed"].values]
    if absent:
        raise MeasureError(f"seeds {absent} have metrics but no accuracy curve in the phases")
    width = int(phases["n_transitions"].max()) + 1 if phases.sizes["seed"] else 1
    names = np.full((len(seeds), width), "", dtype=object)
    counts = np.zeros((len(seeds), width), np.int64)
    starts = np.full((len(seeds), width), np.nan)
    means = []
    for i, seed in enumerate(seeds):
        per_seed = metrics.sel(seed=seed)
        phase, inside = locate(per_seed["step"].values, seed_transitions(phases, seed))
        begins = phase_starts(phases, seed)
        rows = []
        for p in range(width):
            chosen = (phase == p) & ~inside
            rows.append(per_seed.isel(step=np.flatnonzero(chosen)).mean("step"))
            if p < len(begins):
                counts[i, p], starts[i, p] = chosen.sum(), begins[p]
        means.append(xr.concat(rows, dim="phase"))
    mean = xr.concat(means, dim="seed").assign_coords(seed=seeds, phase=np.arange(width))
    circuit = classify_circuit(mean.transpose("seed", "phase", "block"), label_threshold=label_threshold,
                               chunk_threshold=chunk_threshold).values
    for i in range(len(seeds)):
        measured = np.flatnonzero(counts[i] > 0)
        if measured.size:
            seen = mean.isel(seed=i, phase=measured)
            names[i, measured] = _cumulative_names(circuit[i, measured], _rose(seen, rise))
    names[np.isfinite(starts) & (counts == 0)] = UNMEASURED
    return xr.Dataset(
        {"circuit": (("seed", "phase"), names), "n_steps": (("seed", "phase"), counts),
         "phase_start": (("seed", "phase"), starts), **{name: mean[name].transpose("seed", "phase", "block")
                                                        for name in mean.data_vars}},
        coords={"seed": seeds, "phase": np.arange(width)},
        attrs={"label_threshold": float(label_threshold), "chunk_threshold": float(chunk_threshold),
               "rise": float(rise)},
    )
