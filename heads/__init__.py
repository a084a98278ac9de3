"""Attention heads behind in-context learning ([Y] Yang et al., NeurIPS 2025): head scores, selection, ablation and
injection (objects a run applies, or context managers around your own forward passes), task vectors, a fast
single-head ablation sweep, and the whole study in one call.

Submodules are imported on first use, so ``import heads`` stays cheap::

    import heads
    scores = heads.score(loaded, task="sentiment", store="store.zarr")
    ih = heads.top_heads(scores, "ih", fraction=0.1)
    extract(loaded, "store.zarr", setting="ablate_ih", intervention=heads.HeadAblation(ih))
"""

from __future__ import annotations

from extraction.lazy import lazy_getattr

_EXPORTS = {
    "HeadsError": "heads.errors",
    "score": "heads.scores",
    "load_scores": "heads.scores",
    "attention_patterns": "heads.scores",
    "eager_attention": "heads.scores",
    "SCORES": "heads.scores",
    "Head": "heads.selection",
    "top_heads": "heads.selection",
    "select_sets": "heads.selection",
    "random_heads": "heads.selection",
    "layer_placement": "heads.selection",
    "Placement": "heads.selection",
    "parse_heads": "heads.selection",
    "HeadAblation": "extraction.interventions",
    "Injection": "extraction.interventions",
    "ablate": "heads.interventions",
    "inject": "heads.interventions",
    "head_means": "heads.task_vectors",
    "task_vector": "heads.task_vectors",
    "sweep": "heads.sweeps",
    "edge_scan": "heads.flow",
    "flow_table": "heads.flow",
    "EdgeKnockout": "extraction.edges",
    "EdgePatch": "extraction.edges",
    "EDGE_TYPES": "extraction.edges",
    "patched_edge": "extraction.edges",
    "study": "heads.pipeline",
    "HeadStudy": "heads.pipeline",
    "plot_scores": "heads.plots",
    "plot_accuracy": "heads.plots",
    "plot_changes": "heads.plots",
    "plot_study": "heads.plots",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)
