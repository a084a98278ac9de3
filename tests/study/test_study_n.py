"""The study's ``[data] n`` goes up to each task's query pool, and one above it is refused before anything runs."""

from __future__ import annotations

import pytest

from extraction.tasks import load_task
from icl_geometry.cli import main
from icl_geometry.config import ConfigError, DataSection, GeometrySection, HeadsSection, ModelSection, StudyConfig
from icl_geometry.study import Study


def _config(model_dir, n: int, n_score: int = 4) -> StudyConfig:
    return StudyConfig(model=ModelSection(spec=str(model_dir), dtype="float32"),
                       data=DataSection(tasks=["sentiment"], shots=[2], n=n),
                       geometry=GeometrySection(n_boot=0, n_boot_separability=0), heads=HeadsSection(n_score=n_score))


def test_n_may_reach_the_query_pool(tiny_gemma_dir, tmp_path):
    pool = len(load_task("sentiment").test)
    Study(_config(tiny_gemma_dir, pool, n_score=pool), tmp_path).check_data()


@pytest.mark.parametrize("key", ["n", "n_score"])
def test_above_the_pool_is_one_line_naming_its_size_before_anything_runs(key, tiny_gemma_dir, tmp_path, capsys):
    pool = len(load_task("sentiment").test)
    section = "data" if key == "n" else "heads"
    path = tmp_path / "study.toml"
    data = f'[data]\ntasks = ["sentiment"]\n' + (f"n = {pool + 1}\n" if key == "n" else "")
    heads = f"[heads]\nn_score = {pool + 1}\n" if key == "n_score" else ""
    path.write_text(f'[model]\nspec = "{tiny_gemma_dir}"\ndtype = "float32"\n{data}{heads}')
    assert main(["study", str(path), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and f"[{section}] {key} = {pool + 1}" in lines[0] and f"at most {pool}" in lines[0]
    assert not (tmp_path / "out" / "stores").exists()


def test_too_many_shots_for_the_demonstration_pool_is_refused_up_front(tiny_gemma_dir, tmp_path):
    config = _config(tiny_gemma_dir, 4)
    config.data.shots = [10_000]
    with pytest.raises(Exception, match="demonstration pool"):
        Study(config, tmp_path).check_data()
