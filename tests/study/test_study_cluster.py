"""The study's [cluster] section: one Dask client for the whole run, passed to every extraction."""

from __future__ import annotations

from contextlib import contextmanager

import pytest

from icl_geometry.config import ClusterSection, StudyConfig, load_config
from icl_geometry.study import Study


def test_cluster_section_is_read_and_left_out_of_the_fingerprint(tmp_path):
    path = tmp_path / "study.toml"
    path.write_text('[cluster]\nworkers = 4\nexample_chunk = 64\n')
    config = load_config(path)
    assert config.cluster == ClusterSection(workers=4, example_chunk=64)
    assert config.fingerprint() == StudyConfig().fingerprint()  # where it runs does not change the results


class Scored(Exception):
    pass


def test_every_extraction_gets_the_one_client(tiny_gemma, tmp_path, monkeypatch):
    """The plain extractions and the heads study's all run on the study's one client (connected once, closed
    when the run ends)."""
    opened, calls = [], []

    @contextmanager
    def connected(client, workers):
        opened.append((client, workers))
        yield "CLIENT"
        opened.append("closed")

    def stop(*args, **kwargs):
        raise Scored

    record = lambda *args, **kwargs: calls.append(kwargs)  # noqa: E731
    monkeypatch.setattr("extraction.distributed.connected", connected)
    monkeypatch.setattr("extraction.extractor.extract", record)
    monkeypatch.setattr("heads.pipeline.extract", record)
    monkeypatch.setattr("heads.pipeline.score", stop)
    config = StudyConfig(cluster=ClusterSection(scheduler="tcp://head:8786", example_chunk=32))
    study = Study(config, tmp_path, progress=False)
    study._loaded = tiny_gemma
    with study._exits:
        study._extract("sentiment", 2, "icl")
        with pytest.raises(Scored):  # the heads study's own icl and zero-shot groups are extracted first
            study._heads("sentiment")
    assert opened == [("tcp://head:8786", None), "closed"]
    assert [(c["client"], c["example_chunk"]) for c in calls] == [("CLIENT", 32)] * 3
