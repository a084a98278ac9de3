"""The heads study of [Y] in one call: score -> select -> ablate and inject -> re-extract -> measure -> compare.

Groups written into the store (role: default group name; every name can be overridden with ``groups=``):

============== ================= ======================================================================
role           group             prompts and intervention
============== ================= ======================================================================
icl            ``icl``           ``shots``-shot, no intervention (the baseline of the ablations)
zero_shot      ``zero_shot``     zero-shot, no intervention (the baseline of the injections)
ablate_pth     ``ablate_pth``    ``shots``-shot, top PTH heads ablated
ablate_ih      ``ablate_ih``     ``shots``-shot, top IH heads ablated
ablate_random  ``ablate_random`` ``shots``-shot, as many random heads from outside both top sets ablated
inject_ih      ``inject_ih``     zero-shot, IH task vector added to the final state at state index round(3L/8)
inject_pth     ``inject_pth``    zero-shot, PTH task vector added to the final state at state index 2
============== ================= ======================================================================

Head scores are saved as group ``head_scores``. Every step re-uses what the store already holds: extraction
resumes or skips complete groups, scores are re-used when their configuration matches, and a complete intervention
group whose recorded intervention was made the same way is re-used with the vector or means it stores (they are not
recomputed), so a re-run costs only the measures.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import xarray as xr

from extraction.errors import StoreError
from extraction.extractor import accuracy, extract
from extraction.interventions import (MODES, HeadAblation, Injection, Intervention, check_state_index,
                                      recorded_interventions)
from extraction.models import LoadedModel
from extraction.store import open_group
from extraction.tasks import Task
from heads.errors import HeadsError
from heads.records import same_record
from heads.scores import score
from heads.selection import Head, Placement, layer_placement, random_heads, select_sets
from heads.task_vectors import VECTOR_SPACE, head_means, task_vector

log = logging.getLogger(__name__)

ROLES = ("icl", "zero_shot", "ablate_pth", "ablate_ih", "ablate_random", "inject_ih", "inject_pth")
#: Rows of the accuracy table: setting -> role.
SETTINGS = {
    "normal": "icl", "without PTH": "ablate_pth", "without IH": "ablate_ih", "random heads": "ablate_random",
    "zero-shot": "zero_shot", "zero-shot + IH vector": "inject_ih", "zero-shot + PTH vector": "inject_pth",
}
#: Each intervention role and the role it is compared with.
BASELINES = {"ablate_pth": "icl", "ablate_ih": "icl", "ablate_random": "icl", "inject_ih": "zero_shot",
             "inject_pth": "zero_shot"}


@dataclass
class HeadStudy:
    """What :func:`study` found: scores, head sets, layer placement, accuracies and layer-wise measure changes."""

    store: Path
    scores: xr.Dataset
    sets: dict[str, list[Head]]
    placement: Placement
    accuracy: pd.DataFrame
    groups: dict[str, str]
    injection_layers: dict[str, int]
    measures: dict[str, xr.Dataset] = field(default_factory=dict)
    changes: pd.DataFrame | None = None

    def summary(self) -> dict[str, Any]:
        """JSON-ready digest: sets, placement, accuracy table and injection layers."""
        return {
            "store": str(self.store), "groups": self.groups, "injection_layers": self.injection_layers,
            "sets": {name: [list(h) for h in heads] for name, heads in self.sets.items()},
            "placement": self.placement.to_dict(),
            "accuracy": self.accuracy.reset_index().to_dict(orient="records"),
        }


def injection_layer(n_layers: int) -> int:
    """[Y]'s IH injection state index, round(3L/8) rounded half up."""
    return int(np.floor(3 * n_layers / 8 + 0.5))


def _recorded_if_complete(store: Path, group: str, recipe: dict[str, Any]) -> Intervention | None:
    """The intervention ``group`` was written under, when the group is complete and its record agrees with every key
    of ``recipe`` (how the intervention is made: kind, heads, layer, origin ...); otherwise None."""
    try:
        dataset = open_group(store, group)
    except StoreError:
        return None
    records = dataset.attrs.get("intervention")
    if not isinstance(records, list) or len(records) != 1:
        return None
    if not all(same_record(records[0].get(key), value) for key, value in recipe.items()):
        return None
    return recorded_interventions(dataset)[0]


def _extract_with(loaded: LoadedModel, store: Path, group: str, recipe: dict[str, Any],
                  build: Callable[[], Intervention], **extract_kwargs: Any) -> xr.Dataset:
    """Extract ``group`` with the intervention ``build()`` makes, unless the group is complete and was made by
    ``recipe``: then its recorded intervention (with its stored vector or means) is passed, so nothing is recomputed
    and ``extract`` still checks the rest of the configuration."""
    intervention = _recorded_if_complete(store, group, recipe)
    if intervention is None:
        intervention = build()
    else:
        log.info("re-using complete group %s", group)
    return extract(loaded, store, setting=group, intervention=intervention, **extract_kwargs)


def accuracy_table(store: Path, groups: dict[str, str]) -> pd.DataFrame:
    """Accuracy (whole vocabulary, the paper's) and label-restricted accuracy of every setting, indexed by setting."""
    rows = []
    for setting, role in SETTINGS.items():
        dataset = open_group(store, groups[role])
        rows.append({"setting": setting, "group": groups[role], "n": int(dataset.sizes["example"]),
                     **accuracy(dataset)})
    return pd.DataFrame(rows).set_index("setting")


def change_frame(measured: xr.Dataset, baseline: xr.Dataset, group: str, baseline_group: str) -> pd.DataFrame:
    """Per layer and measure of one intervention group: value, its baseline's value and the change (intervention -
    baseline); both are ``geometry.measure`` results."""
    value, base = measured["value"], baseline["value"]
    frame = xr.Dataset({"value": value, "baseline_value": base, "change": value - base}).to_dataframe().reset_index()
    frame.insert(0, "baseline", baseline_group)
    frame.insert(0, "group", group)
    return frame


def measure_changes(measures: dict[str, xr.Dataset], baselines: dict[str, str],
                    groups: dict[str, str] | None = None) -> pd.DataFrame:
    """Per intervention, layer and measure: value, its baseline's value and the change (intervention - baseline).

    ``measures`` and ``baselines`` (intervention -> its baseline) share their keys; ``groups`` names each key's
    store group in the table (default: the key itself)."""
    name = (groups or {}).get
    return pd.concat([change_frame(measures[key], measures[base], name(key, key), name(base, base))
                      for key, base in baselines.items()], ignore_index=True)


def _group_names(groups: dict[str, str] | None) -> dict[str, str]:
    unknown = sorted(set(groups or {}) - set(ROLES))
    if unknown:
        raise HeadsError(f"unknown group role(s) {', '.join(unknown)}; roles are {', '.join(ROLES)}")
    names = {**{role: role for role in ROLES}, **(groups or {})}
    if len(set(names.values())) != len(names):
        raise HeadsError(f"two roles share a group name: {names}")
    return names


def study(
    loaded: LoadedModel,
    store: str | Path,
    *,
    task: str | Task = "sentiment",
    shots: int = 8,
    n: int = 64,
    seed: int = 0,
    fraction: float | None = 0.1,
    k: int | None = None,
    overlap: str = "keep",
    n_score: int = 50,
    pth_first_pair: bool = True,
    mode: str = "zero",
    ih_layer: int | None = None,
    pth_layer: int = 2,
    measures: bool = True,
    n_boot: int = 200,
    batch_size: int = 8,
    groups: dict[str, str] | None = None,
    progress: bool = True,
    cluster: dict[str, Any] | None = None,
    **prompt_options: Any,
) -> HeadStudy:
    """Run [Y]'s heads study on ``task`` and return a :class:`HeadStudy` (see the module docstring for the groups).

    Heads are scored on the first ``n_score`` prompts, the top ``fraction`` (or ``k``) by each score form the PTH
    and IH sets (``overlap``: see :func:`heads.select_sets`), and the random control has the IH set's size. Task
    vectors come from the same ``n_score`` ``shots``-shot prompts. With ``measures`` every group is measured with
    ``geometry.measure`` (``n_boot`` resamples) and the changes against each baseline are tabulated.
    ``prompt_options`` are ``extraction.extract``'s prompt settings (template, separator, ...); ``pth_first_pair``
    is :func:`heads.score`'s. ``cluster`` (``extract``'s ``client``, ``workers``, ``example_chunk``) shards every
    group's extraction over Dask; scoring, head means and task vectors run here.
    """
    store = Path(store)
    names = _group_names(groups)
    arch = loaded.arch
    layers = {"ih": injection_layer(arch.n_layers) if ih_layer is None else ih_layer, "pth": pth_layer}
    for layer in layers.values():
        check_state_index(arch, layer)
    if mode not in MODES:
        raise HeadsError(f"unknown ablation mode {mode!r}; use one of {', '.join(MODES)}")
    common = dict(task=task, n=n, seed=seed, batch_size=batch_size, progress=progress, **(cluster or {}),
                  **prompt_options)
    reference = dict(task=task, shots=shots, n=n_score, seed=seed, batch_size=batch_size, progress=progress,
                     **prompt_options)
    extract(loaded, store, shots=shots, setting=names["icl"], **common)
    extract(loaded, store, shots=0, setting=names["zero_shot"], **common)

    scores = score(loaded, store=store, pth_first_pair=pth_first_pair, **reference)
    sets = select_sets(scores, fraction=fraction, k=k, overlap=overlap)
    sets["random"] = random_heads(arch.n_layers, arch.n_heads, len(sets["ih"]), exclude=sets["pth"] + sets["ih"],
                                  seed=seed)
    placement = layer_placement(sets["ih"], sets["pth"], names=("ih", "pth"))
    log.info("top sets: %s; placement %s", sets, placement)

    source = {"shots": shots, "n": n_score, "seed": seed}  # the reference prompts of head means and task vectors
    means = functools.cache(lambda: head_means(loaded, **reference) if mode == "mean" else None)

    def ablation(name: str, origin: dict[str, Any]) -> HeadAblation:
        return HeadAblation(sets[name], mode, means(), origin=origin)

    def injection(name: str, origin: dict[str, Any]) -> Injection:
        return Injection(task_vector(loaded, sets[name], **reference), layers[name], origin=origin)

    for name in ("pth", "ih", "random"):
        origin = {"set": name, **({"means_reference": source} if mode == "mean" else {})}
        recipe = {"kind": HeadAblation.kind, "heads": [list(h) for h in sets[name]], "mode": mode, "origin": origin}
        _extract_with(loaded, store, names[f"ablate_{name}"], recipe, functools.partial(ablation, name, origin),
                      shots=shots, **common)
    for name, layer in layers.items():
        origin = {"vector": f"{name} task vector", "space": VECTOR_SPACE, "heads": [list(h) for h in sets[name]],
                  "reference": source}
        recipe = {"kind": Injection.kind, "layer": layer, "position": "last", "scale": 1.0, "origin": origin}
        _extract_with(loaded, store, names[f"inject_{name}"], recipe, functools.partial(injection, name, origin),
                      shots=0, **common)

    result = HeadStudy(store, scores, sets, placement, accuracy_table(store, names), names,
                       {f"inject_{name}": layer for name, layer in layers.items()})
    if measures:
        import geometry

        result.measures = {role: geometry.measure(store, group=names[role], n_boot=n_boot, seed=seed,
                                                  progress=progress) for role in ROLES}
        result.changes = measure_changes(result.measures, BASELINES, names)
    return result
