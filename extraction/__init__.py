"""Run a Hugging Face causal LM over ICL prompts and cache per-layer query hidden states to a labelled Zarr store.

Heavy modules (torch, transformers) are imported lazily so that ``extraction.errors`` and ``extraction.store``
stay light for code that only reads stores.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "load_model": "extraction.models",
    "LoadedModel": "extraction.models",
    "default_model_spec": "extraction.models",
    "Architecture": "extraction.architecture",
    "discover_architecture": "extraction.architecture",
    "Task": "extraction.tasks",
    "load_task": "extraction.tasks",
    "list_tasks": "extraction.tasks",
    "PromptConfig": "extraction.prompts",
    "build_prompts": "extraction.prompts",
    "extract": "extraction.extract",
    "ExtractionConfig": "extraction.extract",
    "open_group": "extraction.store",
    "list_groups": "extraction.store",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'extraction' has no attribute {name!r}")
