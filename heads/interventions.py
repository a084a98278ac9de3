"""Interventions as context managers around any forward pass: head ablation and residual-stream injection.

Both register PyTorch hooks on entry and remove them in ``finally``, so the model is unchanged after the block even
when it raises. They yield a JSON-ready description of themselves, meant for ``extraction.extract(...,
intervention=...)``, which records it in the group's attrs::

    with heads.ablate(loaded, [(3, 1), (5, 0)]) as info:
        extract(loaded, store, setting="ablate_ih", intervention=info)

Ablation acts on a head's slice of the attention output *before* the output projection (the projection's input is
the concatenation of the heads, ``n_heads * head_dim`` wide, whatever the number of key/value heads), so zeroing
columns ``h * head_dim:(h + 1) * head_dim`` removes exactly head h's contribution at every position.

Injection adds a vector to the residual stream at one position of state index ``layer``, in the store's convention:
state 0 is the embedding output as block 0 reads it, state l (1..L) is the output of block l-1 (= the input of block
l), the last one before the final norm. Adding at state l therefore changes the input of block l, and the stored
``hidden[:, l]`` of a group extracted inside the block includes the vector.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from extraction.architecture import Architecture, discover_architecture
from heads.errors import HeadsError
from heads.selection import Head

MODES = ("zero", "mean")


def architecture_of(target: Any) -> Architecture:
    """The architecture map of a ``LoadedModel`` or of a Hugging Face causal LM."""
    arch = getattr(target, "arch", None)
    if isinstance(arch, Architecture):
        return arch
    if isinstance(target, nn.Module):
        return discover_architecture(target)
    raise HeadsError(f"expected a LoadedModel or a Hugging Face causal LM, not {type(target).__name__}")


def check_heads(arch: Architecture, heads: Sequence[Head]) -> list[Head]:
    """Validated, de-duplicated heads as (layer, head) int tuples, or a HeadsError saying which one is wrong."""
    if heads is None or len(heads) == 0:
        raise HeadsError("the head set is empty; give at least one (layer, head)")
    checked = []
    for item in heads:
        try:
            layer, head = (int(i) for i in item)
        except (TypeError, ValueError):
            raise HeadsError(f"a head is a (layer, head) pair of ints, not {item!r}") from None
        if not 0 <= layer < arch.n_layers:
            raise HeadsError(f"head {(layer, head)}: layer {layer} is out of range 0..{arch.n_layers - 1}")
        if not 0 <= head < arch.n_heads:
            raise HeadsError(f"head {(layer, head)}: head {head} is out of range 0..{arch.n_heads - 1}")
        if (layer, head) not in checked:
            checked.append((layer, head))
    return checked


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


def _remove(handles: list) -> None:
    for handle in handles:
        handle.remove()


def describe_ablation(heads: Sequence[Head], mode: str = "zero") -> dict[str, Any]:
    """JSON-ready description of an ablation (what :func:`ablate` yields)."""
    return {"kind": "ablate", "mode": mode, "heads": [[int(l), int(h)] for l, h in heads]}


def describe_injection(layer: int, position: str | int = "last", scale: float = 1.0) -> dict[str, Any]:
    """JSON-ready description of an injection (what :func:`inject` yields); the vector's origin is the caller's."""
    return {"kind": "inject", "layer": int(layer), "position": position, "scale": float(scale),
            "state_convention": "state 0 = embedding output, state l = output of block l-1"}


@contextmanager
def ablate(target: Any, heads: Sequence[Head], *, mode: str = "zero",
           means: torch.Tensor | None = None) -> Iterator[dict[str, Any]]:
    """Ablate ``heads`` at every position inside the block: ``zero`` their outputs or replace them by ``means``.

    ``means`` (n_layers, n_heads, head_dim) are per-head mean outputs, e.g. from :func:`heads.head_means`.
    Yields the intervention's description.
    """
    arch = architecture_of(target)
    heads = check_heads(arch, heads)
    if mode not in MODES:
        raise HeadsError(f"unknown ablation mode {mode!r}; use one of {', '.join(MODES)}")
    expected = (arch.n_layers, arch.n_heads, arch.head_dim)
    if mode == "mean" and (means is None or tuple(means.shape) != expected):
        got = "none" if means is None else tuple(means.shape)
        raise HeadsError(f"mean ablation needs means of shape {expected} (from heads.head_means), got {got}")
    handles = []
    try:
        for layer in sorted({l for l, _ in heads}):
            keep = torch.ones(arch.n_heads)
            keep[[h for l, h in heads if l == layer]] = 0
            fill = means[layer] if mode == "mean" else None
            handles.append(arch.output_projections[layer].register_forward_pre_hook(head_patch_hook(arch, keep, fill)))
        yield describe_ablation(heads, mode)
    finally:
        _remove(handles)


def check_vector(arch: Architecture, vector: torch.Tensor) -> torch.Tensor:
    """A residual-stream vector of the model's hidden size, or a HeadsError."""
    vector = torch.as_tensor(vector)
    if vector.shape != (arch.hidden_size,):
        raise HeadsError(f"the vector has shape {tuple(vector.shape)}; the residual stream needs ({arch.hidden_size},)")
    return vector


def check_state_index(arch: Architecture, layer: int) -> None:
    """Raise a HeadsError unless ``layer`` is a residual state index 0..L."""
    if not isinstance(layer, int) or not 0 <= layer <= arch.n_layers:
        raise HeadsError(f"injection layer {layer} is out of range: residual states are 0..{arch.n_layers} "
                         "(0 = embedding output, l = output of block l-1)")


@contextmanager
def inject(target: Any, vector: torch.Tensor, layer: int, *, position: str | int = "last",
           scale: float = 1.0) -> Iterator[dict[str, Any]]:
    """Add ``scale * vector`` to residual state ``layer`` (0..L, see module docstring) at one position.

    ``position`` is ``"last"`` (the query under left padding) or an index into the sequence as fed to the model
    (negative indices count from the end). Yields the intervention's description.
    """
    arch = architecture_of(target)
    vector = check_vector(arch, vector)
    check_state_index(arch, layer)
    if position != "last" and not isinstance(position, int):
        raise HeadsError(f"position must be 'last' or an int, not {position!r}")
    index = -1 if position == "last" else position
    delta = scale * vector

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

    if layer == 0:
        handle = arch.layers[0].register_forward_pre_hook(add_to_input, with_kwargs=True)
    else:
        handle = arch.layers[layer - 1].register_forward_hook(add_to_output)
    try:
        yield describe_injection(layer, position, scale)
    finally:
        handle.remove()
