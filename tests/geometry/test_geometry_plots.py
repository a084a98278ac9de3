"""Figures are written as non-empty PNG and SVG files, including for tiny and degenerate data."""

import pytest

from extraction.store import open_group
from geometry import MeasureError, measure, plot_effective_dimension, plot_measures, plot_projections


@pytest.fixture(scope="module")
def results(tiny_store):
    return [measure(tiny_store, group, n_boot=20, n_boot_separability=5, progress=False)
            for group in ("icl", "zero_shot")]


def non_empty(paths):
    return all(path.is_file() and path.stat().st_size > 500 for path in paths)


def test_measure_grid_and_effective_dimension(results, tmp_path):
    paths = plot_measures(results, tmp_path)
    assert [p.name for p in paths] == ["measures.png", "measures.svg"] and non_empty(paths)
    svg = paths[1].read_text()
    assert "Composite alignment" in svg and "zero_shot" in svg and "layer" in svg
    paths = plot_effective_dimension(results, tmp_path, formats=["png"])
    assert [p.name for p in paths] == ["effective_dimension.png"] and non_empty(paths)


def test_projections_with_pca_and_umap(tiny_store, tmp_path):
    ds = open_group(tiny_store, "topic")
    paths = plot_projections(ds, [0, 2, 4], tmp_path, formats=["svg"])
    svg = paths[0].read_text()
    assert non_empty(paths) and "UMAP, layer 4" in svg and "all states identical" in svg and "sports" in svg
    tiny = plot_projections(ds.isel(example=slice(0, 2)), [3], tmp_path, methods=["pca"], name="two")
    assert non_empty(tiny) and "too few queries (n=2)" in tiny[1].read_text()


def test_bad_plot_requests(results, tiny_store, tmp_path):
    with pytest.raises(MeasureError, match="unknown figure format pdf"):
        plot_measures(results, tmp_path, formats=["pdf"])
    with pytest.raises(MeasureError, match="unknown projection tsne"):
        plot_projections(open_group(tiny_store, "icl"), [1], tmp_path, methods=["tsne"])
