"""Interventions that the run applies itself: head ablation and residual-stream injection, as objects.

An intervention is passed to the run that records it, not entered by hand around it::

    extract(loaded, "store.zarr", setting="ablate_ih", intervention=HeadAblation(ih))

``extract`` applies it around every forward pass of the run and records it with the group, so a group's label and
its states cannot disagree. Every intervention

* checks itself against the model's :class:`~extraction.architecture.Architecture` before anything runs
  (:meth:`Intervention.check`);
* installs its changes for one forward pass onto an :class:`~contextlib.ExitStack` that undoes them on exit, also
  when the pass raises (:meth:`Intervention.install`). It is shown the :class:`Batch` about to run, so kinds that
  depend on the prompts (attention-edge knockout through the mask, patching from a donor run) take the same shape;
* describes itself exactly (:meth:`Intervention.describe`): its ``kind``, its settings, an optional ``origin`` (the
  caller's JSON note of where the heads or the vector came from, kept verbatim) and, under ``data``, the shape and
  sha256 of every array it uses. A group stores those arrays as ``intervention<i>_<name>`` (``i``: the position in
  the run's list; every dimension but the residual ``dim`` is prefixed the same way), so
  :func:`recorded_interventions` rebuilds exactly what a group was written under. Arrays are kept in float32.

:meth:`Intervention.applied` is the same intervention as a context manager for a caller's own forward passes
(``heads.ablate`` and ``heads.inject`` are these). ``extract`` refuses to run inside such a block: pass the object.

Head ablation acts on a head's slice of the attention output *before* the output projection (the projection's input
is the concatenation of the heads, ``n_heads * head_dim`` wide, whatever the number of key/value heads), so
replacing columns ``h * head_dim:(h + 1) * head_dim`` removes exactly head h's contribution at every position.

Injection adds a vector to the residual stream at one position of state index ``layer``, in the store's convention:
state 0 is the embedding output as block 0 reads it, state l (1..L) is the output of block l-1 (= the input of block
l), the last one before the final norm. Adding at state l changes the input of block l, and the stored
``hidden[:, l]`` of a group extracted with it includes the vector.
"""

from __future__ import annotations

import hashlib
import json
import numbers
import weakref
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import nn

from extraction.architecture import Architecture, discover_architecture
from extraction.errors import InterventionError
from extraction.positions import PositionGroups

if TYPE_CHECKING:
    from extraction.prompts import Prompt, PromptSet
    from extraction.tasks import Task

#: A head as (block, head): block index 0..L-1, query-head index within the block.
Head = tuple[int, int]
MODES = ("zero", "mean")
STATE_CONVENTION = "state 0 = embedding output, state l = output of block l-1"
#: Dimensions an intervention's arrays share with the group's own variables (all others are prefixed per intervention).
SHARED_DIMS = ("dim",)


@dataclass(frozen=True)
class Batch:
    """The prompts a forward pass is about to run (tensors may still be on the CPU), with each token's position
    group when the prompts have them (:class:`extraction.positions.PositionGroups`; edge knockouts need them) and
    the rows' :class:`~extraction.prompts.Prompt` objects (edge patches build their donors from them)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    groups: PositionGroups | None = None
    prompts: tuple[Prompt, ...] | None = None


def architecture_of(target: Any) -> Architecture:
    """The architecture map of a ``LoadedModel`` or of a Hugging Face causal LM."""
    arch = getattr(target, "arch", None)
    if isinstance(arch, Architecture):
        return arch
    if isinstance(target, nn.Module):
        return discover_architecture(target)
    raise InterventionError(f"expected a LoadedModel or a Hugging Face causal LM, not {type(target).__name__}")


def sha256(values: np.ndarray) -> str:
    """Hash of an array's float32 bytes (C order): the fingerprint recorded for every intervention array."""
    return hashlib.sha256(np.ascontiguousarray(values, dtype=np.float32).tobytes()).hexdigest()


def _float32(values: Any) -> torch.Tensor:
    """A private float32 CPU copy, so a caller changing its tensor later cannot change what was recorded."""
    return torch.as_tensor(values).detach().to("cpu", torch.float32).clone()


def json_record(origin: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """An intervention's ``origin`` as plain JSON (a copy; None stays None), refused in one line when it is not
    JSON-ready, since it is stored with the run's record."""
    if origin is None:
        return None
    try:
        return json.loads(json.dumps(dict(origin)))
    except (TypeError, ValueError):
        raise InterventionError(f"origin must be a JSON-ready dict (str keys; numbers, strings, lists), "
                                f"not {origin!r}") from None


#: Every intervention kind by its record's ``kind`` (how :func:`recorded_interventions` rebuilds them); each
#: subclass that declares a ``kind`` registers itself.
KINDS: dict[str, type["Intervention"]] = {}


class Intervention(ABC):
    """A change to the model's forward pass that a run applies to every batch and records exactly."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "kind" in cls.__dict__:
            KINDS[cls.kind] = cls

    #: The record's ``kind``.
    kind: ClassVar[str]
    #: How a user builds one (quoted in error messages).
    usage: ClassVar[str]
    #: The caller's note of where the intervention came from, recorded verbatim (or None).
    origin: dict[str, Any] | None

    @abstractmethod
    def check(self, arch: Architecture) -> None:
        """Raise an InterventionError unless this intervention fits ``arch``."""

    def prepare(self, loaded: Any, task: Task, prompts: PromptSet) -> None:
        """Called by a run before its first batch with its model, task and prompts (for kinds that build something
        from them, like an edge patch's donors; nothing by default)."""

    def bind(self, loaded: Any) -> None:
        """Called by whichever process runs the batches (the client, or a Dask worker with its own copy of the
        model) before it applies the intervention (for kinds that run the model themselves; nothing by default)."""

    @abstractmethod
    def install(self, arch: Architecture, batch: Batch | None, stack: ExitStack) -> None:
        """Change the model for one forward pass over ``batch`` (None outside a run); push every undo on ``stack``."""

    @abstractmethod
    def settings(self) -> dict[str, Any]:
        """The JSON-ready settings of the record (everything but kind, data and origin)."""

    def arrays(self) -> dict[str, tuple[tuple[str, ...], np.ndarray]]:
        """The arrays it uses, by name, as (dimension names, float32 values); stored with the group."""
        return {}

    @classmethod
    @abstractmethod
    def from_record(cls, record: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> Intervention:
        """The intervention a record and its stored arrays describe."""

    def describe(self) -> dict[str, Any]:
        """The exact JSON-ready record: kind, settings, origin, and each array's shape and sha256 under ``data``."""
        data = {name: {"shape": list(values.shape), "sha256": sha256(values)}
                for name, (_, values) in self.arrays().items()}
        return {"kind": self.kind, **self.settings(), "data": data, "origin": self.origin}

    @contextmanager
    def applied(self, target: Any, batch: Batch | None = None) -> Iterator[dict[str, Any]]:
        """Apply to every forward pass of ``target`` inside the block (hooks removed on exit); yield the record."""
        arch = architecture_of(target)
        self.check(arch)
        with _marked_active(arch, self), intervening([self], arch, batch):
            yield self.describe()


#: Interventions active in a caller's ``with`` block, per model (keyed by its decoder-layer list).
_ACTIVE: weakref.WeakKeyDictionary[nn.Module, list[Intervention]] = weakref.WeakKeyDictionary()


@contextmanager
def _marked_active(arch: Architecture, item: Intervention) -> Iterator[None]:
    active = _ACTIVE.setdefault(arch.layers, [])
    active.append(item)
    try:
        yield
    finally:
        active.remove(item)


def refuse_active(arch: Architecture) -> None:
    """Raise an InterventionError when a caller's ``with`` block applies an intervention the run would not record."""
    active = _ACTIVE.get(arch.layers)
    if active:
        raise InterventionError(
            f"extract() was called inside a `with` block that applies a {active[-1].kind}; pass it to the run "
            f"instead, as extract(..., intervention={active[-1].usage}), so the group records what its states hold"
        )


@contextmanager
def intervening(interventions: Sequence[Intervention], arch: Architecture, batch: Batch | None = None
                ) -> Iterator[None]:
    """Install ``interventions`` in order for the forward passes inside the block; undo them all on exit."""
    with ExitStack() as stack:
        for item in interventions:
            item.install(arch, batch, stack)
        yield


def _usages() -> str:
    return " or ".join(cls.usage for cls in KINDS.values())


def as_interventions(value: Intervention | Sequence[Intervention] | None) -> list[Intervention]:
    """``extract``'s ``intervention`` argument as a list of objects; a dict (the old, record-only API) is refused."""
    if value is None:
        return []
    if isinstance(value, Intervention):
        return [value]
    if isinstance(value, Mapping):
        raise InterventionError(f"intervention= takes intervention objects, not a dict: pass {_usages()} (or a list "
                                "of them), and extract applies and records them itself; no `with` block is needed")
    if isinstance(value, Sequence) and not isinstance(value, str) and all(isinstance(v, Intervention) for v in value):
        return list(value)
    raise InterventionError(f"intervention= takes an intervention object or a list of them ({_usages()}), "
                            f"not {value!r}")


def stored_arrays(interventions: Sequence[Intervention]) -> dict[str, tuple[tuple[str, ...], np.ndarray]]:
    """The group variables that hold the interventions' arrays: ``intervention<i>_<name>`` (see module docstring)."""
    stored = {}
    for index, item in enumerate(interventions):
        prefix = f"intervention{index}_"
        for name, (dims, values) in item.arrays().items():
            stored[prefix + name] = (tuple(d if d in SHARED_DIMS else prefix + d for d in dims), values)
    return stored


def recorded_interventions(dataset: Any) -> list[Intervention]:
    """The interventions a store group was extracted under, rebuilt from its records and stored arrays."""
    records = dataset.attrs.get("intervention") or []
    if isinstance(records, Mapping):
        raise InterventionError("this group was written by an older version that recorded a description only; "
                                "extract it again with an intervention object to re-apply it")
    rebuilt = []
    for index, record in enumerate(records):
        kind = KINDS.get(record.get("kind"))
        if kind is None:
            raise InterventionError(f"unknown intervention kind {record.get('kind')!r}; known: {', '.join(KINDS)}")
        names = {name: f"intervention{index}_{name}" for name in record.get("data", {})}
        missing = [variable for variable in names.values() if variable not in dataset]
        if missing:
            raise InterventionError(f"the group lacks the intervention array(s) {', '.join(missing)}")
        item = kind.from_record(record, {name: dataset[variable].values for name, variable in names.items()})
        if json.dumps(item.describe(), sort_keys=True) != json.dumps(record, sort_keys=True):
            raise InterventionError(f"intervention {index} of the group does not match its record (hash mismatch?): "
                                    "the store may be corrupted")
        rebuilt.append(item)
    return rebuilt


def _head_pairs(heads: Sequence[Head]) -> list[Head]:
    """Heads as de-duplicated (block, head) int tuples in the given order, or an InterventionError."""
    if heads is None or len(heads) == 0:
        raise InterventionError("the head set is empty; give at least one (block, head)")
    pairs = []
    for item in heads:
        try:
            layer, head = (int(i) for i in item)
        except (TypeError, ValueError):
            raise InterventionError(f"a head is a (block, head) pair of ints, not {item!r}") from None
        if (layer, head) not in pairs:
            pairs.append((layer, head))
    return pairs


def check_heads(arch: Architecture, heads: Sequence[Head]) -> list[Head]:
    """Validated, de-duplicated heads as (block, head) int tuples, or an InterventionError saying which is wrong."""
    pairs = _head_pairs(heads)
    for layer, head in pairs:
        if not 0 <= layer < arch.n_layers:
            raise InterventionError(f"head {(layer, head)}: block {layer} is out of range 0..{arch.n_layers - 1}")
        if not 0 <= head < arch.n_heads:
            raise InterventionError(f"head {(layer, head)}: head {head} is out of range 0..{arch.n_heads - 1}")
    return pairs


def head_patch_hook(arch: Architecture, keep: torch.Tensor, fill: torch.Tensor | None = None):
    """Forward pre-hook for an output projection: keep or replace each head's slice of its input.

    ``keep`` is (n_heads,) or (rows, n_heads) of 1 (keep) and 0 (replace); row-wise masks let one batch hold a
    differently ablated copy per row. Replaced slices become ``fill`` (n_heads, head_dim), or zero when None.
    """
    n_heads, head_dim = arch.n_heads, arch.head_dim

    def patch(module, args):
        x = args[0]
        split = x.reshape(*x.shape[:-1], n_heads, head_dim)
        kept = keep.to(x.device).bool()
        kept = kept.view(kept.shape[0] if kept.ndim == 2 else 1, *([1] * (x.ndim - 2)), n_heads, 1)
        replacement = split.new_zeros(()) if fill is None else fill.to(x.device, x.dtype)
        return (torch.where(kept, split, replacement).reshape(x.shape), *args[1:])

    return patch


class HeadAblation(Intervention):
    """Ablate ``heads`` at every position: ``zero`` their outputs, or replace them by ``means``.

    ``means`` (n_layers, n_heads, head_dim) are per-head mean outputs, e.g. from :func:`heads.head_means`; only
    ``mode="mean"`` takes them, and the record stores them (array ``means``) with their hash.
    """

    kind = "head_ablation"
    usage = "heads.HeadAblation(heads, mode='zero'|'mean', means=...)"

    def __init__(self, heads: Sequence[Head], mode: str = "zero", means: Any = None, *,
                 origin: Mapping[str, Any] | None = None):
        if mode not in MODES:
            raise InterventionError(f"unknown ablation mode {mode!r}; use one of {', '.join(MODES)}")
        if mode != "mean" and means is not None:
            raise InterventionError("means are used only by mode='mean'; drop them or pass mode='mean'")
        self.heads = _head_pairs(heads)
        self.mode = mode
        self.means = None if means is None else _float32(means)
        self.origin = json_record(origin)

    def check(self, arch: Architecture) -> None:
        check_heads(arch, self.heads)
        expected = (arch.n_layers, arch.n_heads, arch.head_dim)
        if self.mode == "mean" and (self.means is None or tuple(self.means.shape) != expected):
            got = "none" if self.means is None else tuple(self.means.shape)
            raise InterventionError(f"mean ablation needs means of shape {expected} (from heads.head_means), got {got}")

    def install(self, arch: Architecture, batch: Batch | None, stack: ExitStack) -> None:
        for layer in sorted({l for l, _ in self.heads}):
            keep = torch.ones(arch.n_heads)
            keep[[h for l, h in self.heads if l == layer]] = 0
            fill = self.means[layer] if self.mode == "mean" else None
            hook = head_patch_hook(arch, keep, fill)
            stack.callback(arch.output_projections[layer].register_forward_pre_hook(hook).remove)

    def settings(self) -> dict[str, Any]:
        return {"heads": [[l, h] for l, h in self.heads], "mode": self.mode}

    def arrays(self) -> dict[str, tuple[tuple[str, ...], np.ndarray]]:
        return {} if self.means is None else {"means": (("block", "head", "head_dim"), self.means.numpy())}

    @classmethod
    def from_record(cls, record: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> HeadAblation:
        return cls(record["heads"], record["mode"], arrays.get("means"), origin=record.get("origin"))


def check_state_index(arch: Architecture, layer: int) -> None:
    """Raise an InterventionError unless ``layer`` is a residual state index 0..L."""
    if not 0 <= layer <= arch.n_layers:
        raise InterventionError(f"injection layer {layer} is out of range: residual states are 0..{arch.n_layers} "
                                "(0 = embedding output, l = output of block l-1)")


class Injection(Intervention):
    """Add ``scale * vector`` to residual state ``layer`` (0..L, see module docstring) at one position.

    ``position`` is ``"last"`` (the query under left padding) or an index into the sequence as fed to the model
    (negative indices count from the end). The record stores the vector (array ``vector``), its hash and its norm.
    """

    kind = "injection"
    usage = "heads.Injection(vector, layer, position='last', scale=1.0)"

    def __init__(self, vector: Any, layer: int, position: str | int = "last", scale: float = 1.0, *,
                 origin: Mapping[str, Any] | None = None):
        if not isinstance(layer, numbers.Integral) or isinstance(layer, bool):
            raise InterventionError(f"injection layer must be an int state index, not {layer!r}")
        if position != "last" and (not isinstance(position, numbers.Integral) or isinstance(position, bool)):
            raise InterventionError(f"position must be 'last' or an int, not {position!r}")
        self.vector = _float32(vector)
        self.layer = int(layer)
        self.position = position if position == "last" else int(position)
        self.scale = float(scale)
        self.origin = json_record(origin)

    def check(self, arch: Architecture) -> None:
        if tuple(self.vector.shape) != (arch.hidden_size,):
            raise InterventionError(f"the vector has shape {tuple(self.vector.shape)}; the residual stream needs "
                                    f"({arch.hidden_size},)")
        check_state_index(arch, self.layer)

    def install(self, arch: Architecture, batch: Batch | None, stack: ExitStack) -> None:
        index = -1 if self.position == "last" else self.position
        delta = self.scale * self.vector

        def add(hidden: torch.Tensor) -> torch.Tensor:
            hidden = hidden.clone()
            hidden[:, index] += delta.to(hidden.device, hidden.dtype)
            return hidden

        def add_to_input(module, args, kwargs):
            if args:
                return (add(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": add(kwargs["hidden_states"])}

        def add_to_output(module, args, output):
            return (add(output[0]), *output[1:]) if isinstance(output, tuple) else add(output)

        if self.layer == 0:
            handle = arch.layers[0].register_forward_pre_hook(add_to_input, with_kwargs=True)
        else:
            handle = arch.layers[self.layer - 1].register_forward_hook(add_to_output)
        stack.callback(handle.remove)

    def settings(self) -> dict[str, Any]:
        return {"layer": self.layer, "position": self.position, "scale": self.scale,
                "vector_norm": float(torch.linalg.vector_norm(self.vector)), "state_convention": STATE_CONVENTION}

    def arrays(self) -> dict[str, tuple[tuple[str, ...], np.ndarray]]:
        return {"vector": (("dim",), self.vector.numpy())}

    @classmethod
    def from_record(cls, record: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> Injection:
        return cls(arrays["vector"], record["layer"], record["position"], record["scale"], origin=record.get("origin"))


# The attention-edge interventions build on the classes above and register themselves in KINDS.
import extraction.edges  # noqa: E402,F401
