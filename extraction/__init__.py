"""Run a Hugging Face causal LM over ICL prompts and cache per-layer query hidden states to a labelled Zarr store.

Heavy modules (torch, transformers) are imported lazily so that ``extraction.errors`` and ``extraction.store``
stay light for code that only reads stores.
"""

from __future__ import annotations

from extraction.lazy import lazy_getattr

_EXPORTS = {
    "load_model": "extraction.models",
    "LoadedModel": "extraction.models",
    "default_model_spec": "extraction.models",
    "Architecture": "extraction.architecture",
    "discover_architecture": "extraction.architecture",
    "Readout": "extraction.readout",
    "Task": "extraction.tasks",
    "load_task": "extraction.tasks",
    "list_tasks": "extraction.tasks",
    "PromptConfig": "extraction.prompts",
    "build_prompts": "extraction.prompts",
    "PairTask": "extraction.pair_tasks",
    "load_pair_task": "extraction.pair_tasks",
    "list_pair_tasks": "extraction.pair_tasks",
    "build_pair_prompts": "extraction.pair_tasks",
    "evaluate_pair_task": "extraction.pair_eval",
    "extract": "extraction.extractor",
    "ExtractionConfig": "extraction.extractor",
    "Intervention": "extraction.interventions",
    "HeadAblation": "extraction.interventions",
    "Injection": "extraction.interventions",
    "EdgeKnockout": "extraction.edges",
    "EdgePatch": "extraction.edges",
    "EDGE_TYPES": "extraction.edges",
    "patched_edge": "extraction.edges",
    "open_group": "extraction.store",
    "list_groups": "extraction.store",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)
