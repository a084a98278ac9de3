"""The study's ``[geometry] normalize_variance`` reaches the sweep and is recorded in its tables and saved config."""

from __future__ import annotations

import pandas as pd

from icl_geometry.config import (DataSection, GeometrySection, HeadsSection, ModelSection, StudyConfig,
                                 load_config)
from icl_geometry.study import Study


def test_unnormalised_variance_alignment_in_the_study(tiny_gemma_dir, tmp_path):
    config = StudyConfig(model=ModelSection(spec=str(tiny_gemma_dir), dtype="float32"),
                         data=DataSection(tasks=["sentiment"], shots=[2], n=8),
                         geometry=GeometrySection(n_boot=0, n_boot_separability=0, normalize_variance=False),
                         heads=HeadsSection(enabled=False))
    Study(config, tmp_path, progress=False).run()
    measures = pd.read_csv(tmp_path / "tables" / "measures.csv")
    assert not measures["normalize_variance"].any()
    assert load_config(tmp_path / "config.toml").geometry.normalize_variance is False
    share = measures[measures.measure == "variance_alignment"]["value"]
    assert (share > 1).any()  # the tiny model's states vary by far more than 1 along d: not a proportion


def test_study_skips_the_denoising_gain_of_an_inexact_lens(tiny_gemma_dir, tmp_path, monkeypatch, caplog):
    """A model whose final norm has no exact gain/bias form (``lens_form_exact: False`` in the store): the study
    finishes, with the denoising gain NaN and a warning saying why, instead of a gain computed with a wrong lens."""
    import logging

    import extraction.extractor as extractor
    from extraction.architecture import NormForm

    fitted = extractor.final_norm_form
    monkeypatch.setattr(extractor, "final_norm_form",
                        lambda arch: NormForm(*[getattr(fitted(arch), f) for f in ("gain", "bias", "center")], False))
    config = StudyConfig(model=ModelSection(spec=str(tiny_gemma_dir), dtype="float32"),
                         data=DataSection(tasks=["sentiment"], shots=[2], n=8),
                         geometry=GeometrySection(n_boot=5, n_boot_separability=2), heads=HeadsSection(enabled=False))
    with caplog.at_level(logging.WARNING, logger="geometry.sweep"):
        Study(config, tmp_path, progress=False).run()
    assert "lens_form_exact=False" in caplog.text and "denoising_gain is skipped" in caplog.text
    measures = pd.read_csv(tmp_path / "tables" / "measures.csv")
    assert measures[measures.measure == "denoising_gain"]["value"].isna().all()
    assert measures[measures.measure == "separability"]["value"].notna().all()
    assert (tmp_path / "report.html").is_file()
