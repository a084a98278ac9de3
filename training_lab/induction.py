"""[S]'s measures of induction-head formation (Singh et al., "What needs to go right for an induction head?").

- **Induction strength** of a head: the mean over examples of the query's attention to the label that follows the
  context item of its own class (the correct label) minus its attention to the other labels (the wrong label;
  their mean when the context has more than two pairs). Examples whose query class is not in the context are left
  out. [S] reads it on the second block's heads; :func:`induction_strength` returns every block.
- **Phase-change time**: the first evaluation step whose held-out loss is below 0.4 ln 2 ([S]'s chance loss is
  ln 2, two labels in the context); :func:`phase_change_steps` gives it per evaluation set (the training
  distribution and the held-out exemplars and classes, where the task has them).

Both read a run store (:func:`training_lab.store.open_run`): the snapshots' ``pattern``, ``context_class`` and
``query_class``, and the curves' ``loss``.
"""

from __future__ import annotations

import math

import xarray as xr

from training_lab.errors import LabError

#: [S]'s phase-change threshold on the held-out loss.
PHASE_CHANGE_LOSS = 0.4 * math.log(2)


def induction_strength(snapshots: xr.Dataset) -> xr.DataArray:
    """Induction strength (step, seed, block, head) from a run's snapshots."""
    classes = snapshots["context_class"]
    pairs = classes.sizes["pair"]
    if pairs < 2:
        raise LabError("induction strength needs at least two (item, label) pairs in the context (task.n_pairs)")
    row = snapshots["pattern"].isel(query=-1)
    labels = row.isel(key=slice(1, 2 * pairs, 2)).drop_vars("key").rename(key="pair")
    match = classes == snapshots["query_class"]
    correct = labels.where(match).sum("pair")
    wrong = labels.where(~match).sum("pair") / (pairs - 1)
    strength = (correct - wrong).where(match.any("pair")).mean("example")
    return strength.transpose("step", "seed", "block", "head").rename("induction_strength")


def phase_change_step(curves: xr.Dataset, threshold: float = PHASE_CHANGE_LOSS) -> xr.DataArray:
    """Per seed, the first evaluation step whose held-out ``loss`` is below ``threshold`` (NaN: never)."""
    below = curves["loss"] < threshold
    first = curves["step"].where(below).min("step")
    return first.rename("phase_change_step")


def phase_change_steps(curves: xr.Dataset, threshold: float = PHASE_CHANGE_LOSS) -> xr.DataArray:
    """The phase-change step (evaluation, seed) per evaluation set: ``train`` from ``loss``, the held-out sets
    from ``heldout_loss`` (:attr:`training_lab.config.TaskConfig.evaluation_sets`); NaN: never."""
    steps = [phase_change_step(curves, threshold).expand_dims(evaluation=["train"])]
    if "heldout_loss" in curves:
        heldout = curves[["heldout_loss"]].rename(heldout_loss="loss", heldout="evaluation")
        steps.append(phase_change_step(heldout, threshold).transpose("evaluation", "seed"))
    return xr.concat(steps, dim="evaluation").rename("phase_change_step")
