"""Named hook points: every intermediate of a lab model passes one, so caching, ablation and clamping (also during
training) are one mechanism.

A :class:`HookPoint` is an identity module that runs the functions attached to it, each of which may return a
replacement value. :class:`Hooks` is a model's table of points by name; its methods are context managers that
always detach their functions on exit (also on an exception), and stay attached for as long as the ``with`` block
runs, so a backward pass inside the block sees the same graph as the forward.

Clamping cuts gradients: :meth:`Hooks.clamp` writes ``value.detach()`` into the chosen entries with ``torch.where``,
so no gradient reaches a clamped entry nor, through it, the parameters that produced it (with ``detach=False``
the gradient still reaches whatever computed the written value).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager
from typing import Callable, Iterable, Iterator, Mapping, Union

import torch
from torch import nn

from training_lab.errors import LabError

#: A hook function: called with the value and its point; returns a replacement value or None to keep it.
HookFn = Callable[[torch.Tensor, "HookPoint"], Union[torch.Tensor, None]]
#: A clamp value: a tensor (broadcast to the value), a number, or a function of the current value.
ClampValue = Union[torch.Tensor, float, Callable[[torch.Tensor], torch.Tensor]]


class HookPoint(nn.Module):
    """An identity module named ``name`` that runs its attached hook functions in order."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name
        self.functions: list[HookFn] = []

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        for function in self.functions:
            replaced = function(value, self)
            if replaced is not None:
                if replaced.shape != value.shape:
                    raise LabError(f"a hook on {self.name!r} returned shape {tuple(replaced.shape)} for a value of "
                                   f"shape {tuple(value.shape)}; return a tensor of the value's shape")
                value = replaced
        return value

    def extra_repr(self) -> str:
        return f"name={self.name!r}, hooks={len(self.functions)}"


class Hooks:
    """A model's hook points by name, with context managers to attach functions, cache, ablate and clamp."""

    def __init__(self, points: Mapping[str, HookPoint]):
        self.points = dict(points)

    @property
    def names(self) -> list[str]:
        return list(self.points)

    def point(self, name: str) -> HookPoint:
        if name not in self.points:
            raise LabError(f"unknown hook point {name!r}; valid names: {', '.join(self.points)}")
        return self.points[name]

    @contextmanager
    def add(self, hooks: Mapping[str, HookFn] | Iterable[tuple[str, HookFn]]) -> Iterator[None]:
        """Attach ``{name: function}`` (or (name, function) pairs) for the ``with`` block; all names are checked
        before anything is attached, and everything attached is detached on exit."""
        pairs = list(hooks.items()) if isinstance(hooks, Mapping) else list(hooks)
        points = [(self.point(name), function) for name, function in pairs]
        attached: list[tuple[HookPoint, HookFn]] = []
        try:
            for point, function in points:
                point.functions.append(function)
                attached.append((point, function))
            yield
        finally:
            for point, function in reversed(attached):
                point.functions.remove(function)

    @contextmanager
    def cache(self, names: Iterable[str] | None = None, *, detach: bool = True) -> Iterator[dict[str, torch.Tensor]]:
        """Yield a dict filled with the latest value at each named point (all points when ``names`` is None)."""
        store: dict[str, torch.Tensor] = {}

        def keep(value: torch.Tensor, point: HookPoint) -> None:
            store[point.name] = value.detach() if detach else value

        with self.add([(name, keep) for name in (self.names if names is None else names)]):
            yield store

    @contextmanager
    def clamp(self, name: str, value: ClampValue, mask: torch.Tensor | None = None, *,
              detach: bool = True) -> Iterator[None]:
        """Overwrite the value at ``name`` with ``value`` where ``mask`` is True (everywhere when None), cutting
        gradients through the overwritten entries. ``mask`` and a tensor ``value`` broadcast to the value.
        ``detach=False`` lets the gradient reach whatever computed ``value`` itself (another forward pass, or
        another point of the same pass); the overwritten entries' own computation still gets none."""

        def overwrite(current: torch.Tensor, point: HookPoint) -> torch.Tensor:
            target = value(current) if callable(value) else value
            target = torch.as_tensor(target, dtype=current.dtype, device=current.device)
            target = target.detach() if detach else target
            if mask is None:
                return target.expand_as(current).clone()
            return torch.where(mask.to(current.device), target, current)

        with self.add({name: overwrite}):
            yield

    def ablate(self, name: str, mask: torch.Tensor | None = None) -> AbstractContextManager[None]:
        """Zero the value at ``name`` (where ``mask`` is True), cutting gradients like :meth:`clamp`."""
        return self.clamp(name, 0.0, mask)
