"""Sharded extraction on a real dask.distributed LocalCluster of 2 single-threaded worker processes."""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest

from extraction.distributed import check_versions, shards
from extraction.errors import ClusterError, StoreError
from extraction.extractor import extract
from extraction.store import list_groups

distributed = pytest.importorskip("distributed")

N, CHUNK = 24, 6
RUN = dict(task="topic", shots=2, n=N, batch_size=4, example_chunk=CHUNK, progress=False)


@pytest.fixture(scope="module")
def client():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  memory_limit="2GiB") as cluster, distributed.Client(cluster) as connected:
        yield connected


@pytest.fixture(scope="module")
def reference(tiny_gemma, tmp_path_factory):
    """The single-process store the sharded runs must reproduce."""
    return extract(tiny_gemma, tmp_path_factory.mktemp("single") / "s.zarr", **RUN)


def extract_tasks(tasks) -> list[dict]:
    """The extraction tasks (one a shard) among a task stream's records."""
    return [task for task in tasks.data if str(task["key"]).startswith("extract-")]


def assert_identical(got, want, exact: bool = True):
    """Same arrays, dtypes and values: bit for bit, or (not ``exact``) floats to rounding. A resumed chunk's
    leftover examples are batched among themselves, with other padding than in one uninterrupted pass."""
    assert set(got.data_vars) == set(want.data_vars)
    for name in want.data_vars:
        assert got[name].dtype == want[name].dtype, name
        if exact or got[name].dtype.kind != "f":
            np.testing.assert_array_equal(got[name].values, want[name].values, err_msg=name)
        else:
            np.testing.assert_allclose(got[name].values, want[name].values, atol=1e-5, err_msg=name)


def test_shards_follow_the_example_chunks():
    parts = shards(np.array([0, 1, 5, 6, 7, 13, 20]), 6)
    assert [p.tolist() for p in parts] == [[0, 1, 5], [6, 7], [13], [20]]
    assert shards(np.array([], dtype=int), 6) == []


def test_sharded_store_equals_the_single_process_store(tiny_gemma, reference, client, tmp_path):
    from distributed import get_task_stream

    with get_task_stream(client) as tasks:
        sharded = extract(tiny_gemma, tmp_path / "d.zarr", client=client, **RUN)
    assert_identical(sharded, reference)
    assert sharded["hidden"].encoding["chunks"][0] == CHUNK and sharded.attrs["example_chunk"] == CHUNK
    ran = extract_tasks(tasks)
    assert len(ran) == N // CHUNK  # one task a chunk
    assert {task["worker"] for task in ran} == set(client.scheduler_info()["workers"])  # both workers wrote
    # each worker loaded the model once and kept it
    loads = client.run(lambda: len(sys.modules["extraction.distributed"]._MODELS))
    assert set(loads.values()) == {1}


def test_an_edge_patch_runs_sharded_on_the_workers_own_model(tiny_gemma, client, tmp_path):
    from extraction.edges import EdgePatch

    def patch():
        return EdgePatch("y->final", blocks=[0, 1], donor="shuffled")

    single = extract(tiny_gemma, tmp_path / "s.zarr", intervention=patch(), **RUN)
    sharded = extract(tiny_gemma, tmp_path / "d.zarr", client=client, intervention=patch(), **RUN)
    assert_identical(sharded, single)
    prepared = patch()
    prepared.prepare(tiny_gemma, *_task_and_prompts())
    assert len(pickle.dumps(prepared)) < 100_000  # the donors travel to the workers, the client's model does not


def _task_and_prompts():
    from extraction.prompts import PromptConfig, build_prompts
    from extraction.tasks import load_task

    task = load_task(RUN["task"])
    return task, build_prompts(task, PromptConfig(shots=RUN["shots"], n=RUN["n"]))


class KillOnce(distributed.WorkerPlugin):
    """Log every example a worker marks done; the first worker to finish a batch dies right after (os._exit)."""

    name = "kill-once"

    def __init__(self, folder: Path):
        self.folder = folder

    def setup(self, worker):
        from extraction.distributed import ShardWriter

        folder, original = self.folder, ShardWriter.mark_done
        self.original = original

        def mark_done(writer, index):
            original(writer, index)
            with open(folder / f"marked-{os.getpid()}.txt", "a") as log:
                log.write("".join(f"{i}\n" for i in index))
            try:  # the flag file is created by exactly one process
                os.close(os.open(folder / "killed", os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                return
            os._exit(1)

        ShardWriter.mark_done = mark_done

    def teardown(self, worker):
        from extraction.distributed import ShardWriter

        ShardWriter.mark_done = self.original


def test_a_worker_killed_mid_shard_loses_and_duplicates_nothing(tiny_gemma, reference, client, tmp_path):
    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    client.register_plugin(KillOnce(tmp_path))
    try:
        recovered = extract(tiny_gemma, tmp_path / "k.zarr", client=client, **RUN)
    finally:
        client.unregister_worker_plugin(KillOnce.name)
    assert (tmp_path / "killed").exists()
    assert_identical(recovered, reference, exact=False)
    marked = np.concatenate([np.loadtxt(f, dtype=int, ndmin=1) for f in tmp_path.glob("marked-*.txt")])
    assert sorted(marked.tolist()) == list(range(N))  # every example computed exactly once


def test_a_stopped_run_resumes_with_only_the_missing_chunks(tiny_gemma, reference, client, tmp_path):
    from extraction.store import GroupWriter

    path = tmp_path / "r.zarr"
    extract(tiny_gemma, path, client=client, **RUN)
    writer = GroupWriter(path, "icl", reference.attrs["config"])
    writer.node["done"][CHUNK:2 * CHUNK + 3] = False  # as if the cluster stopped mid-run
    from distributed import get_task_stream

    with get_task_stream(client) as tasks:
        resumed = extract(tiny_gemma, path, client=client, **RUN)
    assert len(extract_tasks(tasks)) == 2
    assert_identical(resumed, reference, exact=False)


# --- bad input: a clear error before anything is written -----------------------------------------------------------

def test_unreachable_scheduler(tiny_gemma, tmp_path, monkeypatch):
    monkeypatch.setattr("extraction.distributed.CONNECT_TIMEOUT", 1)
    with pytest.raises(ClusterError, match="cannot reach a Dask scheduler at tcp://127.0.0.1:9"):
        extract(tiny_gemma, tmp_path / "u.zarr", client="tcp://127.0.0.1:9", **RUN)
    assert not (tmp_path / "u.zarr").exists()


def test_workers_with_another_version_are_refused(tiny_gemma, client, tmp_path, monkeypatch):
    monkeypatch.setattr("extraction.distributed.installed_version", lambda: "9.9.9")
    with pytest.raises(ClusterError, match=r"2 of 2 Dask workers run icl-geometry .*, this client 9\.9\.9"):
        extract(tiny_gemma, tmp_path / "v.zarr", client=client, **RUN)
    assert not (tmp_path / "v.zarr").exists()


def test_workers_without_the_package_are_named():
    from importlib.metadata import PackageNotFoundError

    with pytest.raises(ClusterError, match="1 of 2 Dask workers run icl-geometry not installed"):
        check_versions("0.1.0", {"a": "0.1.0", "b": PackageNotFoundError("icl-geometry")})


def _blind(probe: str, token: str, model: str | None) -> list[str]:
    """A worker's view of a store on a disk it does not have."""
    return [f"the store's folder {Path(probe).parent} (not there, another disk, or not writable)"]


def _swap_worker_sees(replacement=None):
    module = sys.modules["extraction.distributed"]
    saved = module.__dict__.setdefault("_saved_worker_sees", module._worker_sees)
    module._worker_sees = replacement or saved


def test_store_folder_the_workers_cannot_see(tiny_gemma, client, tmp_path, monkeypatch):
    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    client.run(_swap_worker_sees, _blind)
    try:
        with pytest.raises(ClusterError, match="Dask worker .* cannot see the store's folder"):
            extract(tiny_gemma, tmp_path / "p.zarr", client=client, **RUN)
    finally:
        client.run(_swap_worker_sees)
    assert list(tmp_path.iterdir()) == []  # the probe is gone and no store was written


def test_chunking_must_give_every_worker_a_shard(tiny_gemma, client, tmp_path):
    with pytest.raises(ClusterError, match=r"example_chunk=24 splits 24 prompts into 1 shard\(s\) for 2 workers; "
                                           r"pass example_chunk <= 12"):
        extract(tiny_gemma, tmp_path / "c.zarr", client=client, **{**RUN, "example_chunk": 64})
    assert not (tmp_path / "c.zarr").exists()


def test_example_chunk_is_checked_and_kept_on_resume(tiny_gemma, tmp_path):
    with pytest.raises(StoreError, match="example_chunk must be an integer >= 1"):
        extract(tiny_gemma, tmp_path / "e.zarr", **{**RUN, "example_chunk": 0})
    path = tmp_path / "e.zarr"
    extract(tiny_gemma, path, **{**RUN, "n": 8, "example_chunk": 4})
    with pytest.raises(StoreError, match="is chunked 4 examples along example, not 8; pass example_chunk=4"):
        extract(tiny_gemma, path, **{**RUN, "n": 8, "example_chunk": 8})
    assert list_groups(path) == ["icl"]


def test_statistics_and_both_cluster_arguments_are_refused(tiny_gemma, client, tmp_path):
    with pytest.raises(ClusterError, match="keep='statistics' runs in one process"):
        extract(tiny_gemma, tmp_path / "s.zarr", client=client, keep="statistics", **RUN)
    with pytest.raises(ClusterError, match="either client .* or workers, not both"):
        extract(tiny_gemma, tmp_path / "s.zarr", client=client, workers=2, **RUN)
    assert not (tmp_path / "s.zarr").exists()
