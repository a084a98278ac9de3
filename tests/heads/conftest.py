"""Fixtures of the heads tests: the three tiny models (GQA Gemma 3, Llama, GPT-2) loaded through load_model."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_models(tiny_model_dirs) -> dict:
    """Tiny random models by name, loaded as users load models (float32, eval mode, left padding)."""
    from extraction.models import load_model

    return {name: load_model(str(folder)) for name, folder in tiny_model_dirs.items()}


@pytest.fixture(params=["gemma3", "llama", "gpt2"])
def tiny(request, tiny_models):
    """Each tiny model in turn."""
    return tiny_models[request.param]
