"""Sharded extraction on a Dask cluster: ``extract(..., client=...)`` or ``extract(..., workers=N)``.

The client builds the prompts, checks them, creates the group's layout once, and splits the pending examples into
shards, one per chunk of the store along ``example`` (``example_chunk`` examples). Each shard is one task: the
worker loads the model once (kept in a per-process cache keyed by the model's recipe, so later shards reuse it),
runs the shard's batches, writes their chunk-aligned region of the one Zarr group itself and marks its examples
done. No two tasks touch the same chunk, so there are no locks and nothing is gathered on the client. A worker
killed mid-shard loses only its unfinished batch: Dask reruns the shard elsewhere and the rerun, like any resume,
computes only the examples not yet marked done.

Before anything is written the cluster is checked: the scheduler answers, every worker runs this package at the
client's version, sees the store's folder and the model's files, and the chunking gives every worker a shard.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from extraction.errors import ClusterError
from extraction.store import GroupWriter

PACKAGE = "icl-geometry"
#: Seconds to wait for a scheduler to answer, and for a new local cluster's workers to start.
CONNECT_TIMEOUT = 10


@dataclass(frozen=True)
class ModelRecipe:
    """How a worker loads the client's model: the spec (absolute when it is a local path), the ``load_model``
    options the client's model was loaded with (dtype, attention implementation, device map, memory caps,
    quantisation; JSON text, so the recipe is hashable) and ``device_type``: ``cuda`` without a device map puts
    worker i on GPU i modulo the GPUs it sees; with a device map every worker spreads its copy by that map."""

    spec: str
    options_json: str
    device_type: str

    @classmethod
    def of(cls, loaded: Any) -> ModelRecipe:
        """The recipe of a loaded model (the default model by name: each worker resolves its own copy)."""
        from extraction.models import DEFAULT_MODEL

        spec = loaded.spec if loaded.spec == DEFAULT_MODEL else loaded.provenance.get("model_spec", loaded.spec)
        local = Path(spec).expanduser()
        if local.exists():
            spec = str(local.resolve())
        asked = loaded.provenance
        options = {"dtype": asked.get("dtype", "float32"), "attn_implementation": asked.get("attn_implementation"),
                   "device_map": asked.get("device_map"), "max_memory": asked.get("max_memory"),
                   "quantization_config": asked.get("quantization")}
        options = {key: value for key, value in options.items() if value is not None}
        return cls(spec, json.dumps(options, sort_keys=True), loaded.device.type)

    @property
    def options(self) -> dict[str, Any]:
        """The ``load_model`` keyword arguments of the client's model."""
        return json.loads(self.options_json)

    @property
    def local_path(self) -> str | None:
        """The model's path when it is a file or folder (every worker must see it), else None (hub id, default)."""
        return self.spec if Path(self.spec).is_absolute() else None


#: Models loaded in this (worker) process, by recipe: each worker loads its model once and keeps it.
_MODELS: dict[ModelRecipe, Any] = {}


def worker_model(recipe: ModelRecipe) -> Any:
    """The recipe's model in this process, loaded on first use (on this worker's GPU when the client's is one)."""
    if recipe not in _MODELS:
        from extraction.models import DEFAULT_MODEL, load_model

        device = None
        if recipe.device_type == "cuda" and "device_map" not in recipe.options:
            import torch
            from distributed import get_worker

            name = get_worker().name
            device = f"cuda:{(name if isinstance(name, int) else 0) % max(1, torch.cuda.device_count())}"
        spec = None if recipe.spec == DEFAULT_MODEL else recipe.spec
        _MODELS[recipe] = load_model(spec, device=device, **recipe.options)
    return _MODELS[recipe]


# -- connecting ---------------------------------------------------------------------------------------------------

@contextmanager
def connected(client: Any = None, workers: int | None = None) -> Iterator[Any]:
    """The Dask client to run on: ``client`` itself, a client of the scheduler at address ``client``, or of a new
    local cluster of ``workers`` single-threaded worker processes (closed on exit); None when both are None."""
    if client is None and workers is None:
        yield None
        return
    if client is not None and workers is not None:
        raise ClusterError("pass either client (a Dask client or scheduler address) or workers, not both")
    try:
        import distributed
    except ImportError as error:
        raise ClusterError(f"sharded extraction needs Dask: pip install '{PACKAGE}[dask]'") from error
    if workers is not None:
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ClusterError(f"workers must be an integer >= 1, not {workers!r}")
        with distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                      dashboard_address=None) as cluster, distributed.Client(cluster) as local:
            yield local
        return
    if isinstance(client, str):
        try:
            remote = distributed.Client(client, timeout=CONNECT_TIMEOUT)
        except (OSError, TimeoutError, ValueError) as error:
            raise ClusterError(f"cannot reach a Dask scheduler at {client} within {CONNECT_TIMEOUT} s "
                               f"({type(error).__name__}); start one (dask scheduler) or check the address") from error
        with remote:
            yield remote
        return
    if not isinstance(client, distributed.Client):
        raise ClusterError(f"client must be a dask.distributed.Client or a scheduler address, not {client!r}")
    yield client


# -- checks before anything is written ----------------------------------------------------------------------------

def installed_version() -> str:
    """This process's installed version of the package ('not installed' when it is missing)."""
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _worker_sees(probe: str, token: str, model: str | None) -> list[str]:
    """What this worker cannot see or write (as short phrases): the client's probe file and the model's files."""
    problems = []
    path = Path(probe)
    if not (path.is_file() and path.read_text() == token) or not os.access(path.parent, os.W_OK):
        problems.append(f"the store's folder {path.parent} (not there, another disk, or not writable)")
    if model is not None and not Path(model).exists():
        problems.append(f"the model {model}")
    return problems


def check_versions(client_version: str, worker_versions: dict[str, Any]) -> None:
    """Refuse workers without the package (their answer is the lookup's error) or with another version than the
    client's, in one line naming what they run."""
    found = {worker: "not installed" if isinstance(version, BaseException) else version
             for worker, version in worker_versions.items()}
    wrong = {worker: version for worker, version in found.items() if version != client_version}
    if wrong:
        found = ", ".join(sorted({str(v) for v in wrong.values()}))
        raise ClusterError(f"{len(wrong)} of {len(worker_versions)} Dask workers run {PACKAGE} {found}, this client "
                           f"{client_version}; install {PACKAGE}=={client_version} on every worker (pip install "
                           f"'{PACKAGE}[dask]=={client_version}') and restart them")


def _existing_ancestor(path: Path) -> Path:
    path = path.resolve()
    while not path.exists():
        path = path.parent
    return path if path.is_dir() else path.parent


def check_cluster(client: Any, store: str | Path, recipe: ModelRecipe) -> int:
    """Check the workers before anything is written; return how many there are.

    Every worker must run this package at the client's version, see the folder the store is (or will be) in
    through the same path (a probe file written by the client and removed after) and the model's files."""
    try:
        client.wait_for_workers(1, timeout=CONNECT_TIMEOUT)
    except (TimeoutError, OSError) as error:
        raise ClusterError(f"the Dask cluster has no workers after {CONNECT_TIMEOUT} s; start some "
                           "(dask worker SCHEDULER_ADDRESS)") from error
    check_versions(installed_version(), client.run(importlib.metadata.version, PACKAGE, on_error="return"))
    probe = _existing_ancestor(Path(store)) / f".icl-geometry-probe-{uuid.uuid4().hex}"
    token = uuid.uuid4().hex
    try:
        probe.write_text(token)
    except OSError as error:
        raise ClusterError(f"cannot write next to the store {store} ({error.strerror})") from error
    try:
        seen = client.run(_worker_sees, str(probe), token, recipe.local_path, on_error="return")
    finally:
        probe.unlink()
    for worker, problems in sorted(seen.items()):
        if isinstance(problems, BaseException):
            raise ClusterError(f"Dask worker {worker} failed a check ({type(problems).__name__}: {problems})")
        if problems:
            raise ClusterError(f"Dask worker {worker} cannot see {' nor '.join(problems)}; put the store and the "
                               "model on a path every worker reaches (a shared file system) under the same name")
    return len(seen)


def check_chunking(n: int, example_chunk: int, n_workers: int) -> None:
    """Refuse a chunking that leaves workers without a shard (each shard is one chunk along ``example``)."""
    shards = math.ceil(n / example_chunk)
    if shards < n_workers:
        raise ClusterError(f"example_chunk={example_chunk} splits {n} prompts into {shards} shard(s) for "
                           f"{n_workers} workers; pass example_chunk <= {max(1, n // n_workers)} "
                           "(--example-chunk) so every worker gets one")


# -- running ------------------------------------------------------------------------------------------------------

def shards(pending: np.ndarray, example_chunk: int) -> list[np.ndarray]:
    """Pending example indices grouped by the store chunk along ``example`` that holds them."""
    if len(pending) == 0:
        return []
    chunk = pending // example_chunk
    cuts = np.flatnonzero(np.diff(chunk)) + 1
    return np.split(pending, cuts)


class ShardWriter(GroupWriter):
    """A worker's writer: it writes its shard's examples and marks them done; the client consolidates once at
    the end (workers never write the store's shared metadata)."""

    consolidates = False


def run_shard(recipe: ModelRecipe, path: str, group: str, config: dict[str, Any], index: np.ndarray,
              items: list, fill: Callable[..., None], fill_kwargs: dict[str, Any]) -> int:
    """One task: extract the examples of ``index`` (one chunk) not yet done into the group; return how many."""
    writer = ShardWriter(path, group, config)
    if writer.node is None:
        raise ClusterError(f"Dask worker sees no group {group!r} in {path}; is the store on a shared file system?")
    todo = ~writer.node["done"].get_orthogonal_selection((index,))
    if todo.any():
        loaded = worker_model(recipe)
        if loaded.provenance.get("model_sha256") != config["model_sha256"]:
            raise ClusterError(f"the model a Dask worker loaded from {recipe.spec} differs from the client's (sha256 "
                               f"{loaded.provenance.get('model_sha256')} vs {config['model_sha256']}); give every "
                               "worker the same model file")
        fill(loaded, writer, index[todo], [items[i] for i in np.flatnonzero(todo)], **fill_kwargs)
    return int(todo.sum())


def run_on_cluster(client: Any, recipe: ModelRecipe, writer: GroupWriter, items: list, example_chunk: int,
                   fill: Callable[..., None], fill_kwargs: dict[str, Any], bar: Any) -> int:
    """Run every pending shard of ``writer``'s group on the cluster (``items``: what ``fill`` takes for each
    example, a shard's sent with its task); return how many examples were computed."""
    from distributed import as_completed

    token = uuid.uuid4().hex[:8]
    futures = [
        client.submit(run_shard, recipe, str(writer.path), writer.group, writer.config, index,
                      [items[i] for i in index], fill, fill_kwargs, pure=False,
                      key=f"extract-{writer.group}-{int(index[0]) // example_chunk}-{token}")
        for index in shards(writer.pending(), example_chunk)
    ]
    computed = 0
    for future in as_completed(futures):
        count = future.result()
        computed += count
        bar.update(count)
    return computed

