"""Plainly worded findings computed from a study's tables: what ICL changes, and which stage each ablation hurts.

Every sentence is derived from numbers in the tables, so a reader can check it against them. The rules:

* the **early stage** is summarised by separability, the **late stage** by composite alignment, both averaged over
  the last third of the layers (where the paper's transition has happened);
* an intervention "hurts" a stage when it lowers that average by more than ``threshold`` (absolute) relative to its
  baseline (``icl`` for ablations, ``zero_shot`` for injections) and "lifts" it when it raises it by as much.
"""

from __future__ import annotations

import pandas as pd

#: The paper's 8-shot accuracy (%) of Gemma-2B: normal / without PTH / without IH / random heads ([Y], Fig. 7).
PAPER_GEMMA_2B = {"icl": 66.16, "ablate_pth": 16.24, "ablate_ih": 1.20, "ablate_random": 36.48}

#: Human names of the study's groups, in report order.
SETTING_NAMES = {
    "icl": "ICL (normal)",
    "zero_shot": "zero-shot",
    "ablate_pth": "without PTH",
    "ablate_ih": "without IH",
    "ablate_random": "random heads ablated",
    "inject_ih": "zero-shot + IH task vector",
    "inject_pth": "zero-shot + PTH task vector",
}
BASELINES = {"ablate_pth": "icl", "ablate_ih": "icl", "ablate_random": "icl", "inject_ih": "zero_shot",
             "inject_pth": "zero_shot"}
STAGES = {"separability": "separability (early stage)", "composite_alignment": "composite alignment (late stage)"}


def late_mean(measures: pd.DataFrame, group: str, measure: str) -> float:
    """Mean of one measure over the last third of the layers for one group (NaN when absent)."""
    rows = measures[(measures.group == group) & (measures.measure == measure)]
    if rows.empty:
        return float("nan")
    layers = sorted(rows.layer.unique())
    late = layers[len(layers) - max(1, len(layers) // 3):]
    return float(rows[rows.layer.isin(late)].value.mean())


def _percent(value: float) -> str:
    return f"{100 * value:.1f}%"


def _accuracy_sentence(accuracy: pd.DataFrame) -> list[str]:
    by_group = accuracy.set_index("group")
    if not {"icl", "zero_shot"} <= set(by_group.index):
        return []
    icl, zero = by_group.loc["icl"], by_group.loc["zero_shot"]
    return [
        f"ICL accuracy is {_percent(icl.accuracy)} against {_percent(zero.accuracy)} zero-shot over the whole "
        f"vocabulary (label words only: {_percent(icl.label_accuracy)} vs {_percent(zero.label_accuracy)})."
    ]


def _icl_vs_zero_sentence(measures: pd.DataFrame) -> list[str]:
    values = {(g, m): late_mean(measures, g, m) for g in ("icl", "zero_shot") for m in STAGES}
    if any(pd.isna(v) for v in values.values()):
        return []
    gains = {m: values["icl", m] - values["zero_shot", m] for m in STAGES}
    changes = [f"{_direction(gain)} {m.replace('_', ' ')} ({gain:+.3f})" for m, gain in gains.items()]
    return [f"Over the last third of the layers, demonstrations {changes[0]} and {changes[1]} relative to zero-shot."]


def _direction(change: float) -> str:
    return "raise" if change > 0 else "lower" if change < 0 else "leave unchanged"


def _transition_sentences(transitions: pd.DataFrame) -> list[str]:
    sentences = []
    for row in transitions.itertuples():
        if row.group in ("icl", "zero_shot"):
            name = SETTING_NAMES.get(row.group, row.group)
            if pd.isna(row.transition_layer):
                sentences.append(f"{name}: no alignment rise after separability plateaus (no transition).")
            else:
                sentences.append(f"{name}: separability plateaus by layer {int(row.plateau_layer)}; composite "
                                 f"alignment rises most steeply at layer {int(row.transition_layer)} (the transition, "
                                 f"{row.rise:+.3f}).")
    return sentences


def _stage_effect(change: float, threshold: float) -> str | None:
    if change < -threshold:
        return "hurts"
    if change > threshold:
        return "lifts"
    return None


def _intervention_sentences(accuracy: pd.DataFrame, measures: pd.DataFrame, threshold: float) -> list[str]:
    by_group = accuracy.set_index("group")
    sentences = []
    for group, baseline in BASELINES.items():
        if group not in by_group.index or baseline not in by_group.index:
            continue
        delta = by_group.loc[group].accuracy - by_group.loc[baseline].accuracy
        effects = []
        for measure, stage in STAGES.items():
            change = late_mean(measures, group, measure) - late_mean(measures, baseline, measure)
            verb = _stage_effect(change, threshold)
            if verb:
                effects.append(f"{verb} {stage} ({change:+.3f})")
        stage_text = "; it " + " and ".join(effects) if effects else "; neither stage moves by more than " \
                                                                    f"{threshold:g}"
        sentences.append(f"{SETTING_NAMES[group]}: accuracy {_percent(by_group.loc[baseline].accuracy)} -> "
                         f"{_percent(by_group.loc[group].accuracy)} ({100 * delta:+.1f} points){stage_text}.")
    if {"ablate_ih", "ablate_random"} <= set(by_group.index):
        ih, random = by_group.loc["ablate_ih"].accuracy, by_group.loc["ablate_random"].accuracy
        verdict = "more" if ih < random else "less"
        sentences.append(f"Ablating the induction heads lowers accuracy {verdict} than ablating as many random heads "
                         f"({_percent(ih)} vs {_percent(random)}).")
    return sentences


def task_findings(accuracy: pd.DataFrame, measures: pd.DataFrame, transitions: pd.DataFrame,
                  placement: pd.DataFrame | None = None, threshold: float = 0.02) -> list[str]:
    """Findings for one task from its accuracy, measure, transition and placement tables."""
    sentences = _accuracy_sentence(accuracy) + _icl_vs_zero_sentence(measures) + _transition_sentences(transitions)
    sentences += _intervention_sentences(accuracy, measures, threshold)
    if placement is not None and not placement.empty:
        row = placement.iloc[0]
        order = "later" if row.mean_block_ih > row.mean_block_pth else "earlier"
        sentences.append(f"The top induction heads sit {order} than the top previous-token heads (mean block "
                         f"{row.mean_block_ih:.1f} vs {row.mean_block_pth:.1f}; Mann-Whitney U p = {row.p_value:.3g}; "
                         "Gemma-2B in the paper: 12.2 vs 6.2).")
    return sentences


def flow_findings(flow: pd.DataFrame) -> list[str]:
    """[B]'s question in words from an edge-scan table (``heads.flow_table``): per half of the model (windows
    starting in the lower vs upper half of the blocks), the edge types whose knockout lowers accuracy most, with the
    mean accuracy and gold-logit change over that half's windows."""
    change = flow[flow.quantity.isin(["accuracy_change", "logit_change"])]
    if change.empty:
        return []
    n_blocks = int(change.window_last.max()) + 1
    half = (n_blocks + 1) // 2
    sentences = []
    for name, rows in (("lower", change[change.window < half]), ("upper", change[change.window >= half])):
        if rows.empty:
            continue
        means = rows.pivot_table(index="edge", columns="quantity", values="value", aggfunc="mean")
        means = means.sort_values("accuracy_change")
        ranked = "; ".join(f"{edge} {row.accuracy_change:+.2f} (logit {row.logit_change:+.2f})"
                           for edge, row in means.iterrows())
        first, last = int(rows.window.min()), int(rows.window_last.max())
        sentences.append(f"Windows starting in the {name} blocks ({first}-{last}): mean accuracy change by edge "
                         f"knocked out, most harmful first: {ranked}.")
    return sentences
