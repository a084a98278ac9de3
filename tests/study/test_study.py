"""The study end to end on a tiny random model: every artefact, resume after an interruption, same tables."""

from __future__ import annotations

import dataclasses

import pandas as pd
import pytest

from icl_geometry.config import DataSection, GeometrySection, HeadsSection, ModelSection, StudyConfig
from icl_geometry.stages import Stage
from icl_geometry.study import Study

ARTEFACTS = [
    "config.toml", "stages.json", "study.json", "report.html",
    "tables/accuracy.csv", "tables/measures.csv", "tables/transitions.csv", "tables/changes.csv",
    "tables/head_scores.csv", "tables/head_sets.csv", "tables/placement.csv",
    "figures/sentiment/curves.png", "figures/sentiment/curves.svg", "figures/sentiment/changes.png",
    "figures/sentiment/head_scores.png", "figures/sentiment/projections.png", "figures/sentiment/k_sweep.png",
]


def tiny_config(model_dir) -> StudyConfig:
    return StudyConfig(
        model=ModelSection(spec=str(model_dir), dtype="float32", batch_size=4),
        data=DataSection(tasks=["sentiment"], shots=[0, 1, 2], n=12),
        geometry=GeometrySection(n_boot=20),
        heads=HeadsSection(shots=2, n_score=6, fraction=0.25),
    )


@pytest.fixture(scope="module")
def finished(tiny_gemma_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("study")
    Study(tiny_config(tiny_gemma_dir), folder, progress=False).run()
    return folder


def test_study_writes_every_artefact(finished):
    missing = [name for name in ARTEFACTS if not (finished / name).is_file() or (finished / name).stat().st_size == 0]
    assert not missing
    groups = set(pd.read_csv(finished / "tables/accuracy.csv").group)
    assert groups == {"icl", "icl_k1", "zero_shot", "ablate_pth", "ablate_ih", "ablate_random", "inject_ih",
                      "inject_pth"}
    html = (finished / "report.html").read_text()
    assert "data:image/png;base64," in html and "without IH" in html and "Findings" in html
    # head tables are indexed by block (0..L-1), never by 'layer', which names stored residual states (0..L)
    assert {"block", "head", "pth", "ih"} <= set(pd.read_csv(finished / "tables/head_scores.csv").columns)
    assert {"set", "block", "head"} == set(pd.read_csv(finished / "tables/head_sets.csv").columns) - {"task"}
    assert {"mean_block_ih", "mean_block_pth"} <= set(pd.read_csv(finished / "tables/placement.csv").columns)


def test_pth_first_pair_reaches_the_head_scores(tiny_gemma_dir, tmp_path, monkeypatch):
    import heads.pipeline

    class Scored(Exception):
        pass

    def stop(*args, pth_first_pair, **kwargs):
        raise Scored(pth_first_pair)

    monkeypatch.setattr(heads.pipeline, "score", stop)
    config = tiny_config(tiny_gemma_dir)
    config.heads.pth_first_pair = False
    with pytest.raises(Scored) as scored:
        Study(config, tmp_path, progress=False)._heads("sentiment")
    assert scored.value.args == (False,)


def test_finished_study_runs_nothing_again(finished, tiny_gemma_dir):
    study = Study(tiny_config(tiny_gemma_dir), finished, progress=False)
    study.run()
    assert study._loaded is None  # every stage was skipped: the model was never loaded


def _interrupt_at(study: Study, stage_name: str) -> list[Stage]:
    """The study's stages with ``stage_name`` replaced by one that raises (an interruption)."""
    def interrupted():
        raise KeyboardInterrupt

    return [dataclasses.replace(s, run=interrupted) if s.name == stage_name else s for s in study.stages()]


def test_resume_after_interruption_gives_the_same_tables(finished, tiny_gemma_dir, tmp_path, monkeypatch):
    config = tiny_config(tiny_gemma_dir)
    study = Study(config, tmp_path, progress=False)
    stages = _interrupt_at(study, "sentiment: geometry")
    monkeypatch.setattr(study, "stages", lambda: stages)
    with pytest.raises(KeyboardInterrupt):
        study.run()
    done = set(study.manifest.done)
    assert "sentiment: heads" in done and "sentiment: geometry" not in done
    monkeypatch.undo()
    Study(config, tmp_path, progress=False).run()
    for table in ("accuracy", "measures", "placement", "head_scores"):
        pd.testing.assert_frame_equal(pd.read_csv(tmp_path / f"tables/{table}.csv"),
                                      pd.read_csv(finished / f"tables/{table}.csv"))


def test_other_configuration_in_the_same_folder_is_refused(finished, tiny_gemma_dir):
    from icl_geometry.config import ConfigError

    config = tiny_config(tiny_gemma_dir)
    config.data.n = 10
    with pytest.raises(ConfigError, match="another configuration"):
        Study(config, finished, progress=False)


def test_min_rise_reaches_the_transition_table(tiny_gemma_dir, tmp_path):
    config = tiny_config(tiny_gemma_dir)
    config.heads.enabled = False
    config.geometry.min_rise = 1e9  # no rise is that large: no group has a transition
    Study(config, tmp_path, progress=False).run()
    transitions = pd.read_csv(tmp_path / "tables" / "transitions.csv")
    assert len(transitions) > 0 and transitions["transition_layer"].isna().all()
