"""Fixtures of the geometry tests: a tiny-model store with ICL, zero-shot and 4-class groups, built once."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_store(tiny_gemma, tmp_path_factory) -> Path:
    """A store of the tiny Gemma: ``icl`` (sentiment, 2 shots, n=16), ``zero_shot`` (n=16), ``topic`` (4 classes)."""
    from extraction.extractor import extract

    store = tmp_path_factory.mktemp("geometry") / "s.zarr"
    extract(tiny_gemma, store, task="sentiment", shots=2, n=16, progress=False)
    extract(tiny_gemma, store, task="sentiment", shots=0, n=16, progress=False)
    extract(tiny_gemma, store, task="topic", shots=2, n=24, setting="topic", progress=False)
    return store
