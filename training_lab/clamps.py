"""Declarative clamps ([S]'s "optogenetics"): overwrite chosen activations at every training step and in every
evaluation, so no gradient reaches a clamped value nor, through it, the parameters that produced only it.

A :class:`ClampSpec` names a hook point (a per-block name such as ``attn.pattern`` with the ``blocks`` it applies
to, or a model-level name such as ``readout.input``), the ``heads`` and ``positions`` it overwrites (empty: all)
and the value written there:

- ``zero``, ``constant`` (the number ``constant``), ``mean`` (the batch mean of the value, per run);
- ``previous_token`` (on ``attn.pattern`` only): each position attends fully to the one before it (position 0 to
  itself), a perfect previous-token head;
- ``induction`` (on ``attn.pattern`` only, the query row only): the query attends with weight ``strength`` s to
  the label that follows the context item of its own class and spreads 1 - s uniformly over all positions (s = 1:
  a perfect induction head; s = 0: uniform attention). Needs ``task.query_in_context`` (as in [S]'s layout
  exemplar, label, exemplar, label, query, the query's class is always in the context).

Specs validate on their own (value names, strength in [0, 1]) and against a model and task
(:meth:`ClampSpec.check`: the point exists, blocks, heads and positions are in range, a pattern fits the context),
each failure one :class:`LabError` line, before any training. :func:`applied` attaches a list of specs for one
forward pass through :meth:`training_lab.hooks.Hooks.clamp`; several specs compose in order.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch

from training_lab.errors import LabError
from training_lab.points import BLOCK_AXES, MODEL_AXES, model_points

if TYPE_CHECKING:
    from training_lab.config import ModelConfig, TaskConfig
    from training_lab.model import LabTransformer
    from training_lab.tasks import Batch

VALUES = ("zero", "constant", "mean", "previous_token", "induction")
PATTERNS = ("previous_token", "induction")


@dataclass(frozen=True)
class ClampSpec:
    """One clamp: ``point`` (per-block or model-level hook point name), ``blocks`` / ``heads`` / ``positions``
    (empty: all), ``value`` (one of :data:`VALUES`), ``constant`` (for ``value="constant"``) and ``strength``
    (for ``value="induction"``)."""

    point: str
    value: str = "zero"
    blocks: tuple[int, ...] = ()
    heads: tuple[int, ...] = ()
    positions: tuple[int, ...] = ()
    constant: float = 0.0
    strength: float = 1.0

    def __post_init__(self) -> None:
        for name in ("blocks", "heads", "positions"):
            indices = tuple(int(i) for i in getattr(self, name))
            if any(i < 0 for i in indices) or len(set(indices)) != len(indices):
                raise LabError(f"clamp on {self.point!r}: {name} must be distinct non-negative indices, "
                               f"got {list(indices)}")
            object.__setattr__(self, name, indices)
        if self.value not in VALUES:
            raise LabError(f"clamp on {self.point!r}: unknown value {self.value!r}; valid values: {', '.join(VALUES)}")
        if not 0.0 <= self.strength <= 1.0:
            raise LabError(f"clamp on {self.point!r}: strength must be in [0, 1], got {self.strength}")
        if self.value in PATTERNS and self.point != "attn.pattern":
            raise LabError(f"clamp value {self.value!r} is an attention pattern; use it on point 'attn.pattern', "
                           f"not {self.point!r}")
        if self.value == "induction" and self.positions:
            raise LabError("an 'induction' clamp sets the query row only; leave its positions empty")

    def to_dict(self) -> dict[str, Any]:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return {name: list(value) if isinstance(value, tuple) else value for name, value in values.items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ClampSpec":
        valid = {f.name for f in fields(cls)}
        extra = set(data) - valid
        if extra:
            raise LabError(f"unknown key(s) {sorted(extra)} in [[clamp]]; valid keys: {sorted(valid)}")
        if "point" not in data:
            raise LabError("a [[clamp]] needs a point, e.g. point = \"attn.pattern\"")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})

    def names(self, n_blocks: int) -> list[str]:
        """The full hook point names this spec clamps."""
        if self.point in MODEL_AXES:
            return [self.point]
        return [f"blocks.{b}.{self.point}" for b in (self.blocks or range(n_blocks))]

    def check(self, model: "ModelConfig", task: "TaskConfig") -> None:
        """Fail with one line if this spec does not fit ``model`` and ``task``."""
        if self.axes is None:
            raise LabError(f"clamp on unknown hook point {self.point!r}; valid points: "
                           f"{', '.join([*BLOCK_AXES, *MODEL_AXES])} (per-block points take blocks)")
        if self.point in MODEL_AXES and self.point != "embed" and self.point not in model_points(model.readout):
            raise LabError(f"clamp on {self.point!r}: a {model.readout} read-out has no such point; valid "
                           f"read-out points: {', '.join(model_points(model.readout))}")
        if self.point in MODEL_AXES and self.blocks:
            raise LabError(f"clamp on {self.point!r}: a model-level point takes no blocks")
        _, head_axis, position_axis = self.axes
        for name, indices, axis, size in (("blocks", self.blocks, 0, model.n_blocks),
                                          ("heads", self.heads, head_axis, model.n_heads),
                                          ("positions", self.positions, position_axis, task.seq_len)):
            if indices and axis is None:
                raise LabError(f"clamp on {self.point!r}: its value has no {name[:-1]} axis; leave {name} empty")
            if any(i >= size for i in indices):
                raise LabError(f"clamp on {self.point!r}: {name} {list(indices)} out of range (the model and "
                               f"context have {size})")
        if self.value == "induction" and not task.query_in_context:
            raise LabError("an 'induction' clamp needs the query's class in the context; set "
                           "task.query_in_context = true")

    @property
    def axes(self) -> tuple[int, int | None, int | None] | None:
        """(dims, head axis, position axis) of the point's value; None for an unknown point."""
        return BLOCK_AXES.get(self.point, MODEL_AXES.get(self.point))

    def mask(self, model: "ModelConfig", task: "TaskConfig") -> torch.Tensor | None:
        """The boolean mask (broadcastable to the point's value) of the entries to overwrite; None: all."""
        dims, head_axis, position_axis = self.axes
        positions = (task.seq_len - 1,) if self.value == "induction" else self.positions
        if not self.heads and not positions:
            return None
        mask = torch.ones([1] * dims, dtype=torch.bool)
        for axis, indices, size in ((head_axis, self.heads, model.n_heads),
                                    (position_axis, positions, task.seq_len)):
            if indices:
                chosen = torch.zeros(size, dtype=torch.bool)
                chosen[list(indices)] = True
                mask = mask & chosen.view([-1 if a == axis else 1 for a in range(dims)])
        return mask

    def target(self, batch: "Batch", task: "TaskConfig") -> float | torch.Tensor | Any:
        """The value to write: a number, a tensor broadcasting to the point's value, or a function of the value."""
        if self.value == "zero":
            return 0.0
        if self.value == "constant":
            return float(self.constant)
        if self.value == "mean":
            return lambda current: current.mean(dim=1, keepdim=True)
        seq = task.seq_len
        if self.value == "previous_token":
            previous = torch.zeros(seq, seq)
            previous[torch.arange(seq), (torch.arange(seq) - 1).clamp(min=0)] = 1.0
            return previous
        slot = (batch.context_classes == batch.query_class.unsqueeze(-1)).float().argmax(dim=-1)  # (R, B)
        pattern = torch.full((*slot.shape, 1, seq, seq), (1.0 - self.strength) / seq)
        pattern[..., 0, -1, :].scatter_add_(-1, (2 * slot + 1).unsqueeze(-1),
                                            torch.full((*slot.shape, 1), float(self.strength)))
        return pattern


def check_all(specs: Sequence[ClampSpec], model: "ModelConfig", task: "TaskConfig") -> None:
    for spec in specs:
        spec.check(model, task)


@contextmanager
def applied(model: "LabTransformer", specs: Sequence[ClampSpec], batch: "Batch",
            task: "TaskConfig") -> Iterator[None]:
    """Attach ``specs`` (in order) to ``model`` for the forward pass of ``batch`` within the ``with`` block."""
    with ExitStack() as stack:
        for spec in specs:
            target, mask = spec.target(batch, task), spec.mask(model.config, task)
            for name in spec.names(model.config.n_blocks):
                stack.enter_context(model.hooks.clamp(name, target, mask))
        yield
