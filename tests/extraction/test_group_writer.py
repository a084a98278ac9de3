"""The group writer counts the examples left instead of re-reading ``done`` after every batch, and refreshes the
consolidated metadata exactly when it marks the last one."""

import numpy as np
import pytest

from extraction import store
from extraction.distributed import ShardWriter
from extraction.store import GroupWriter

N = 10


@pytest.fixture
def consolidations(monkeypatch):
    """The paths the writers consolidate, in order."""
    calls = []
    monkeypatch.setattr(store, "consolidate", calls.append)
    return calls


def never(*args):
    raise AssertionError("read the whole done array")


def created(path) -> GroupWriter:
    writer = GroupWriter(path, "g", {"n": N})
    writer.create({"done": (("example",), (N,), "bool")}, {}, {}, example_chunk=4)
    return writer


def test_the_last_mark_consolidates_once_without_reading_done(tmp_path, consolidations):
    writer = created(tmp_path / "s.zarr")
    consolidations.clear()  # creating consolidates too
    writer.pending = never
    for index in ([0, 1, 2, 3], [4, 5, 6, 7], [0, 1], [8]):  # [0, 1] again: re-marked examples are not new
        writer.mark_done(np.array(index))
        assert consolidations == []
    writer.mark_done(np.array([9]))
    assert consolidations == [writer.path]
    writer.mark_done(np.array([8, 9]))  # nothing new: the metadata is already current
    assert consolidations == [writer.path]
    assert writer.remaining == 0


def test_a_resumed_writer_counts_what_is_left_once(tmp_path, consolidations):
    path = tmp_path / "s.zarr"
    created(path).mark_done(np.array([0, 1, 2, 3, 8]))
    consolidations.clear()
    resumed = GroupWriter(path, "g", {"n": N})
    assert resumed.remaining == 5
    resumed.pending = never
    resumed.mark_done(np.array([3, 4, 5]))  # 3 was done before the interruption
    resumed.mark_done(np.array([6, 7]))
    assert consolidations == [] and resumed.remaining == 1
    resumed.mark_done(np.array([9]))
    assert consolidations == [path]
    assert bool(resumed.node["done"][:].all())


def test_a_workers_writer_neither_counts_nor_consolidates(tmp_path, consolidations):
    path = tmp_path / "s.zarr"
    created(path)
    consolidations.clear()
    worker = ShardWriter(path, "g", {"n": N})
    worker.pending = never
    worker.mark_done(np.arange(N))  # every example, as if the other workers' shards were done too
    assert consolidations == []
    assert bool(worker.node["done"][:].all())
