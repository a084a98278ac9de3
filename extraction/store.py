"""The on-disk store: one Zarr v3 store, one group per setting (``icl``, ``zero_shot``, ``ablate_ih`` ...).

Each group opens lazily as an xarray Dataset with ``xarray.open_zarr(path, group=name)`` (or :func:`open_group`).
Schema of a group (dimension names: ``example``, ``layer``, ``dim``, ``class``, ``shot``, ``token``):

=====================  =========================  ==============================================================
variable               dims                       meaning
=====================  =========================  ==============================================================
``hidden``             example, layer, dim        query-position residual state (float32 or float16)
``label``              example                    gold class index 0..m-1
``query_index``        example                    index of the query in the task's query pool
``pred_token``         example                    the model's whole-vocabulary top-1 token id at the query
``correct``            example                    whether ``pred_token`` is the gold label word's token
``label_logits``       example, class             the model's final logits of the label words' tokens
``lens_label_logits``  example, layer, class      logit lens (final norm applied) restricted to label tokens
``lens_top_token``     example, layer             logit lens whole-vocabulary top-1 token id
``demo_indices``       example, shot              demonstration-pool indices of the prompt's shots, in order
``prompt``             example                    the prompt text
``n_tokens``           example                    prompt length in tokens
``position_kind``      example, token             each token's position group (code table: attrs
                                                  ``position_kinds``, :mod:`extraction.positions`); tokens
                                                  left-aligned (index 0 = first token), -1 after the prompt
``position_demo``      example, token             each token's demonstration index (x_i, y_i, their template
                                                  and separator); -1 elsewhere and after the prompt
``done``               example                    written completely (resume marker; written last per batch)
``unembed``            class, dim                 unembedding rows of the label words' tokens
``lens_unembed``       class, dim                 ``unembed`` times the final norm's gain (see ``lens_*`` attrs)
``lens_bias``          class                      label logits' offset from the norm's and LM head's biases
``label_token``        class                      token id of each label word (coordinate ``class`` = words)
=====================  =========================  ==============================================================

The root holds consolidated metadata (Zarr's ``zarr.json`` of the root lists every group's arrays and attrs), so
``xarray.open_zarr(path, group=name)`` opens a group with one read and no warning. It is refreshed after every
change of metadata this package makes (a group created, completed, replaced, or its attrs updated); the package
itself always reads the per-node metadata (``use_consolidated=False``), so a stale copy written by another tool
never misleads it. Chunk writes do not touch metadata, so an interrupted run resumes as before.

Group attrs: ``config`` (the extraction configuration with the model's identity: spec, hash, dtype, quantisation,
see :attr:`extraction.models.LoadedModel.identity`; a resume must match it), ``provenance`` (model spec and
hash or revision, dtype, library versions), ``layer_convention``, ``lens_convention``, ``lens_center`` (whether
the final norm subtracts the mean), ``lens_form_exact`` (whether the norm has that array form), ``lens_logit_scale``
and ``lens_softcap`` (the read-out's output post-processing: label logits are ``c * tanh(s * z / c)`` of the raw
``z = normalise(h) @ lens_unembedᵀ + lens_bias``, or ``s * z`` when ``lens_softcap`` is None),
``position_kinds`` (group kind name -> code), ``intervention``
(None for plain runs, else the list of the interventions' records, see :mod:`extraction.interventions`, whose arrays
are stored as ``intervention<i>_<name>``), ``n_layers``, ``task``, ``shots``. The provenance also holds the loading
options (``device``, ``device_map``, ``max_memory``, ``quantization``, ``attn_implementation``) and the module
``placement`` of a split model.
Chunks hold whole layers: ``hidden`` is chunked (examples, 1, dim), so one layer reads without the others.
Along ``example`` every array is chunked alike, ``example_chunk`` examples a chunk (default 512, attrs
``example_chunk``): a run's batches never span two chunks, and a sharded run (:mod:`extraction.distributed`) gives
each worker whole chunks, so no two processes ever write one chunk.
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import xarray as xr
import zarr

from extraction.errors import GroupClashError, ICLGeometryError, StoreError

EXAMPLE_CHUNK = 512
#: What zarr, its codecs and the JSON parser raise on a damaged or foreign store (zarr's own errors are ValueErrors);
#: zarr's warning about a node whose metadata is missing or unreadable counts as damage too.
READ_ERRORS = (OSError, ValueError, KeyError, RuntimeError, TypeError, zarr.errors.ZarrUserWarning)


@contextmanager
def reading(path: str | Path) -> Iterator[None]:
    """Turn a failure to read the store at ``path`` (missing or garbled metadata or chunks, not a Zarr store)
    into a :class:`StoreError` that says what to do; the project's own errors pass through unchanged."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", zarr.errors.ZarrUserWarning)
            yield
    except ICLGeometryError:
        raise
    except READ_ERRORS as error:
        detail = " ".join(str(error).split())[:200] or type(error).__name__
        raise StoreError(f"{path} is not a readable icl-geometry store ({type(error).__name__}: {detail}); check "
                         "the path, or re-create the store (or the damaged group) with icl-geometry extract") from error


def open_root(path: str | Path, mode: str = "r") -> zarr.Group:
    """The store's root group from the per-node metadata (never the consolidated copy, which may be stale)."""
    return zarr.open_group(str(path), mode=mode, use_consolidated=False)


def consolidate(path: str | Path) -> None:
    """Write the root's consolidated metadata (the whole store's metadata in one place) for ``xarray.open_zarr``.

    Zarr warns that consolidated metadata is not yet part of the v3 specification; xarray reads it regardless,
    so the warning is silenced here.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", zarr.errors.ZarrUserWarning)
        zarr.consolidate_metadata(str(path))


def list_groups(path: str | Path) -> list[str]:
    """Names of the setting groups in a store."""
    path = Path(path)
    if not path.exists():
        raise StoreError(f"no store at {path}")
    with reading(path):
        return sorted(name for name, _ in open_root(path).groups())


def delete_group(path: str | Path, group: str) -> None:
    """Remove one group from a store (e.g. one written with another configuration that is to be redone)."""
    del open_root(path, mode="a")[group]
    consolidate(path)


def open_group(path: str | Path, group: str) -> xr.Dataset:
    """Open one setting group lazily as an xarray Dataset, with a clear error if it is missing."""
    groups = list_groups(path)
    if group not in groups:
        raise StoreError(f"store {path} has no group {group!r}; it has {', '.join(groups) or 'no groups'}")
    with reading(path):
        dataset = xr.open_zarr(str(path), group=group, consolidated=False)
        complete = "done" not in dataset or bool(dataset["done"].all())
    if not complete:
        missing = int((~dataset["done"]).sum())
        raise StoreError(f"group {group!r} of {path} is incomplete ({missing} examples not written); re-run to resume")
    return dataset


def stored_example_chunk(path: str | Path, group: str) -> int | None:
    """Examples per chunk along ``example`` of an existing group (None when the store or the group is missing)."""
    if not Path(path).exists():
        return None
    with reading(path):
        root = open_root(path)
        return root[group]["done"].chunks[0] if group in root and "done" in root[group] else None


def canonical(value: Any) -> str:
    """A configuration (or one of its values) as canonical JSON, so two runs' configurations compare by value."""
    return json.dumps(value, sort_keys=True, default=str)


#: Configuration keys added after stores were first written -> what a stored configuration without the key was
#: written with (such a store resumes when the new run has that value, and is refused otherwise).
LATER_KEYS: dict[str, Any] = {"quantization": None}
_MISSING = object()


def differences(stored: dict[str, Any], config: dict[str, Any], prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """Where a group's ``stored`` configuration and a run's ``config`` differ: dotted key (into nested tables) ->
    (stored value, run's value); a key of :data:`LATER_KEYS` missing from either counts as its old default."""
    if not prefix:
        stored, config = {**LATER_KEYS, **stored}, {**LATER_KEYS, **config}
    changes: dict[str, tuple[Any, Any]] = {}
    for key in sorted(set(stored) | set(config)):
        was, now = stored.get(key, _MISSING), config.get(key, _MISSING)
        if isinstance(was, dict) and isinstance(now, dict):
            changes.update(differences(was, now, f"{prefix}{key}."))
        elif was is _MISSING or now is _MISSING or canonical(was) != canonical(now):
            changes[f"{prefix}{key}"] = (was, now)
    return changes


def _shown(value: Any, limit: int = 100) -> str:
    """A configuration value as short JSON for a one-line message ("missing" for a key one side lacks)."""
    text = "missing" if value is _MISSING else canonical(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def library_versions(names: Sequence[str]) -> dict[str, str]:
    """The Python version and the installed version of each named distribution, for a store's provenance."""
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


class GroupWriter:
    """Creates a group's arrays up front and fills them batch by batch, so an interrupted run can resume.

    ``done`` is written after the other arrays of a batch, so an example counts as written only when all of it is.
    When the last example is done the writer refreshes the consolidated metadata (unless ``consolidates`` is False:
    a worker of a sharded run leaves that to the client). It knows the last one by counting (:attr:`remaining`),
    so a batch reads only its own chunk of ``done``, never the whole array.
    """

    consolidates = True

    def __init__(self, path: str | Path, group: str, config: dict[str, Any], *, overwrite: bool = False):
        self.path, self.group, self.config = Path(path), group, config
        with reading(self.path):
            self.root = open_root(self.path, mode="a")
            existing = self.root[group] if group in self.root else None
        self.node: zarr.Group | None = None
        self._remaining: int | None = None
        if existing is not None:
            if overwrite:
                del self.root[group]
                consolidate(self.path)
            else:
                changes = differences(existing.attrs.get("config", {}), config)
                if changes:
                    shown = "; ".join(f"{key} ({_shown(was)} stored, {_shown(now)} now)"
                                      for key, (was, now) in changes.items())
                    raise GroupClashError(
                        f"group {group!r} in {self.path} was written with a different configuration "
                        f"(differs in: {shown})", path=self.path, group=group,
                        changed=sorted({key.split(".")[0] for key in changes}),
                        remedy="choose another setting name or pass overwrite=True to replace it",
                    )
                self.node = existing

    @property
    def exists(self) -> bool:
        return self.node is not None

    def pending(self) -> np.ndarray:
        """Indices of examples not yet written."""
        return np.flatnonzero(~self.node["done"][:])

    @property
    def remaining(self) -> int:
        """How many examples are not yet marked done: counted from ``done`` on first use, then kept by
        :meth:`mark_done` (and by a subclass that completes examples itself)."""
        if self._remaining is None:
            self._remaining = len(self.pending())
        return self._remaining

    @remaining.setter
    def remaining(self, count: int) -> None:
        self._remaining = count

    @property
    def example_chunk(self) -> int:
        """Examples per chunk along ``example`` (every array alike)."""
        return self.node["done"].chunks[0]

    def create(self, arrays: dict[str, tuple[tuple[str, ...], tuple[int, ...], str]], static: dict[str, np.ndarray],
               attrs: dict[str, Any], example_chunk: int = EXAMPLE_CHUNK) -> None:
        """Create the group: ``arrays`` maps name to (dims, shape, dtype) filled later, chunked ``example_chunk``
        examples along ``example``; ``static`` is written now."""
        node = self.root.create_group(self.group)
        for name, (dims, shape, dtype) in arrays.items():
            chunks = tuple(min(example_chunk, s) if d == "example" else 1 if d == "layer" else s
                           for d, s in zip(dims, shape))
            fill = np.nan if np.dtype(dtype).kind == "f" else 0 if dtype != str else ""
            node.create_array(name, shape=shape, chunks=tuple(max(c, 1) for c in chunks), dtype=dtype,
                              dimension_names=dims, fill_value=fill)
        for name, (dims, values) in static.items():
            values = np.asarray(values)
            array = node.create_array(name, shape=values.shape, dtype=values.dtype if values.dtype.kind != "U" else str,
                                      dimension_names=dims)
            array[...] = values
        node.attrs.update({**attrs, "config": self.config, "example_chunk": node["done"].chunks[0]})
        self.node, self.remaining = node, node["done"].shape[0]
        consolidate(self.path)

    def write(self, index: np.ndarray, values: dict[str, np.ndarray], *, done: bool = True) -> None:
        """Write one batch at example positions ``index`` (sorted, contiguous or not), then mark it done (unless not
        ``done``: a writer that completes examples later marks them itself)."""
        for name, value in values.items():
            array = self.node[name]
            array.set_orthogonal_selection((index,) + (slice(None),) * (array.ndim - 1), np.asarray(value))
        if done:
            self.mark_done(index)

    def mark_done(self, index: np.ndarray) -> None:
        """Mark the examples at ``index`` written (the resume marker); the call that marks the last pending example
        refreshes the consolidated metadata (a writer that does not consolidate keeps no count: in a sharded run
        other processes mark the other examples)."""
        last = self.consolidates and self._count_new(index)
        self.node["done"].set_orthogonal_selection((index,), np.ones(len(index), dtype=bool))
        if last:
            consolidate(self.path)

    def _count_new(self, index: np.ndarray) -> bool:
        """Take the examples of ``index`` not yet done (examples marked again do not count) off :attr:`remaining`;
        whether they were the last ones. Reads only ``index``'s chunks of ``done``."""
        before = self.remaining
        unique = np.unique(index)
        self.remaining = before - int(np.count_nonzero(~self.node["done"].get_orthogonal_selection((unique,))))
        return before > 0 and self.remaining == 0

    def set_attrs(self, **attrs: Any) -> None:
        self.node.attrs.update(attrs)
        consolidate(self.path)
