"""Declarative clamps ([S]'s "artificial optogenetics"): overwrite chosen activations at every training step and in
every evaluation.

A :class:`ClampSpec` names a hook point (a per-block name such as ``attn.pattern`` with the ``blocks`` it applies
to, or a model-level name such as ``readout.input``), the ``heads`` and ``positions`` it overwrites (empty: all)
and the value written there. Fixed values (no gradient reaches a clamped entry, nor, through it, the parameters
that produced only it):

- ``zero``, ``constant`` (the number ``constant``), ``mean`` (the batch mean of the value, per run); on
  ``attn.v`` or ``attn.head_out`` with ``heads`` these are [S]'s value / output ablations of those heads;
- ``previous_token`` (on ``attn.pattern`` only): each position attends fully to the one before it (position 0 to
  itself), a perfect previous-token head;
- ``induction`` (on ``attn.pattern`` only, the query row only): the query attends with weight ``strength`` s to
  the label that follows the context item of its own class and spreads 1 - s uniformly over all positions (s = 1:
  a perfect induction head; s = 0: uniform attention). Needs ``task.query_in_context`` (as in [S]'s layout
  exemplar, label, exemplar, label, query, the query's class is always in the context).

Computed values, from the current weights; as in [S]'s code (which differentiates through every pass, with no
stop-gradient), the gradient reaches whatever computed the written value, while the overwritten entries' own
computation gets none:

- ``preserve`` (any point): the value an extra, *unclamped* forward pass of the same batch computes at that point
  with the current weights ([S]'s ``opto_preserve_patterns`` / ``_values`` / ``_queries`` / ``_keys``: e.g. a value
  ablation in block 0 with ``preserve`` on ``attn.pattern`` keeps every later pattern as the intact network
  computes it). The loss's gradient through a preserved entry reaches the weights through that extra pass. Cost:
  one extra forward (and its backward) per step, only when a ``preserve`` clamp exists.
- ``previous_token_input`` (on ``attn.scores`` of blocks >= 1): the block's scores as an extra pass computes them
  when the previous block's output is, at every position but the first and the last (the query), the *previous*
  position's input to that block (for block 1: the previous token's embedding), as a perfect previous-token head
  that copies only its source would leave it. With block b-1's ``attn.head_out`` zeroed, so that block b's values
  read each token's own input, this is [S]'s idealised layer-1 output (``perfect_prev_token_input``).
- ``perfect_copy`` (on ``logits``; ``blocks = [b]``, ``heads = [h]`` name the head read): [S]'s perfect copy
  (``opto_perfect_copy_from_head_pattern``): the logits are that head's pre-softmax scores from the query to the
  context's label positions, each written at its label's logit (a log-sum-exp if a label occurs twice), every
  label absent from the context at -1e9; the model's own read-out is bypassed, so the prediction is the head's
  attention over the context's labels, copied perfectly. The head's scores are read after every other clamp has
  written them (so they compose with ``previous_token_input``). Needs ``task.query_in_context``.

[S]'s sub-circuits of an induction head, as named clamp sets (``circuit = "A" | "B" | "C"`` in a ``[[clamp]]``
table, with ``blocks = [b]`` the induction head's block, default the last one): **A**, previous-token attend and
copy, made perfect: block b-1's ``attn.head_out`` zeroed and block b's ``attn.scores`` from
``previous_token_input`` (needs b >= 1; takes no heads); **B**, the induction head's query-key match, made
perfect: an ``induction`` pattern with ``strength`` on block b's ``heads`` (empty: all); **C**, the induction
head's copy, made perfect: ``perfect_copy`` from block b's one head in ``heads``. [S]'s clamp runs keep one head
of block b active (the others' values zeroed: add ``attn.v`` ``zero`` clamps on them).

Specs validate on their own (value names, strength in [0, 1]) and against a model and task
(:meth:`ClampSpec.check`: the point exists, blocks, heads and positions are in range, a pattern fits the context),
each failure one :class:`LabError` line, before any training. :func:`applied` attaches a list of specs for one
forward pass through :meth:`training_lab.hooks.Hooks.clamp`; several specs compose in order.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch
from torch.nn import functional as F

from training_lab.errors import LabError
from training_lab.points import BLOCK_AXES, MODEL_AXES, model_points

if TYPE_CHECKING:
    from training_lab.config import ModelConfig, TaskConfig
    from training_lab.model import LabTransformer
    from training_lab.tasks import Batch

VALUES = ("zero", "constant", "mean", "previous_token", "induction", "preserve", "previous_token_input",
          "perfect_copy")
#: Values that fit one point only: value -> (point, what the value is).
ONLY_ON = {"previous_token": ("attn.pattern", "an attention pattern"),
           "induction": ("attn.pattern", "an attention pattern"),
           "previous_token_input": ("attn.scores", "a block's attention scores"),
           "perfect_copy": ("logits", "the read-out's logits")}
#: Values computed from the current weights: the gradient reaches what computed them.
COMPUTED = ("preserve", "previous_token_input", "perfect_copy")
#: [S]'s sub-circuits of an induction head (see the module doc).
CIRCUITS = {"A": "previous-token attend and copy", "B": "induction query-key match", "C": "induction copy"}
#: The logit of a label absent from the context under a perfect copy.
ABSENT_LOGIT = -1e9


@dataclass(frozen=True)
class ClampSpec:
    """One clamp: ``point`` (per-block or model-level hook point name), ``blocks`` / ``heads`` / ``positions``
    (empty: all), ``value`` (one of :data:`VALUES`), ``constant`` (for ``value="constant"``) and ``strength``
    (for ``value="induction"``); or a named sub-circuit ``circuit`` (one of :data:`CIRCUITS`, with ``blocks``,
    ``heads`` and ``strength`` only), which :meth:`expand` turns into plain specs."""

    point: str = ""
    value: str = "zero"
    blocks: tuple[int, ...] = ()
    heads: tuple[int, ...] = ()
    positions: tuple[int, ...] = ()
    constant: float = 0.0
    strength: float = 1.0
    circuit: str = ""

    def __post_init__(self) -> None:
        for name in ("blocks", "heads", "positions"):
            indices = tuple(int(i) for i in getattr(self, name))
            if any(i < 0 for i in indices) or len(set(indices)) != len(indices):
                raise LabError(f"clamp on {self.where!r}: {name} must be distinct non-negative indices, "
                               f"got {list(indices)}")
            object.__setattr__(self, name, indices)
        if not 0.0 <= self.strength <= 1.0:
            raise LabError(f"clamp on {self.where!r}: strength must be in [0, 1], got {self.strength}")
        if self.circuit:
            self._validate_circuit()
            return
        if not self.point:
            raise LabError("a [[clamp]] needs a point, e.g. point = \"attn.pattern\", or a circuit (A, B or C)")
        if self.value not in VALUES:
            raise LabError(f"clamp on {self.point!r}: unknown value {self.value!r}; valid values: {', '.join(VALUES)}")
        if self.value in ONLY_ON and self.point != ONLY_ON[self.value][0]:
            point, what = ONLY_ON[self.value]
            raise LabError(f"clamp value {self.value!r} is {what}; use it on point {point!r}, not {self.point!r}")
        if self.value in ("induction", "perfect_copy") and self.positions:
            raise LabError(f"a {self.value!r} clamp sets the query's values only; leave its positions empty")

    def _validate_circuit(self) -> None:
        if self.circuit not in CIRCUITS:
            raise LabError(f"unknown clamp circuit {self.circuit!r}; valid circuits: "
                           + ", ".join(f"{name} ({meaning})" for name, meaning in CIRCUITS.items()))
        if self.point or self.value != "zero" or self.positions or self.constant:
            raise LabError(f"a circuit clamp ({self.circuit}) takes blocks, heads and strength only; leave point, "
                           "value, positions and constant out")
        if self.strength != 1.0 and self.circuit != "B":
            raise LabError(f"strength applies to circuit B (the induction match) only, not {self.circuit}")

    @property
    def where(self) -> str:
        """The point, or the circuit, for messages."""
        return self.point or f"circuit {self.circuit}"

    def to_dict(self) -> dict[str, Any]:
        if self.circuit:
            return {"circuit": self.circuit, "blocks": list(self.blocks), "heads": list(self.heads),
                    "strength": self.strength}
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "circuit"}
        return {name: list(value) if isinstance(value, tuple) else value for name, value in values.items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ClampSpec":
        valid = {f.name for f in fields(cls)}
        extra = set(data) - valid
        if extra:
            raise LabError(f"unknown key(s) {sorted(extra)} in [[clamp]]; valid keys: {sorted(valid)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})

    def expand(self, model: "ModelConfig") -> tuple["ClampSpec", ...]:
        """The plain specs this spec stands for: itself, or its circuit's clamps (see the module doc)."""
        if not self.circuit:
            return (self,)
        block = self.blocks[0] if self.blocks else model.n_blocks - 1
        if self.circuit == "A":
            return (ClampSpec("attn.head_out", "zero", blocks=(block - 1,)),
                    ClampSpec("attn.scores", "previous_token_input", blocks=(block,)))
        if self.circuit == "B":
            return (ClampSpec("attn.pattern", "induction", blocks=(block,), heads=self.heads,
                              strength=self.strength),)
        return (ClampSpec("logits", "perfect_copy", blocks=(block,), heads=self.heads),)

    def names(self, n_blocks: int) -> list[str]:
        """The full hook point names this (plain) spec clamps."""
        if self.point in MODEL_AXES:
            return [self.point]
        return [f"blocks.{b}.{self.point}" for b in (self.blocks or range(n_blocks))]

    def check(self, model: "ModelConfig", task: "TaskConfig") -> None:
        """Fail with one line if this spec does not fit ``model`` and ``task``."""
        if self.circuit:
            self._check_circuit(model)
            check_all(self.expand(model), model, task)
            return
        if self.axes is None:
            raise LabError(f"clamp on unknown hook point {self.point!r}; valid points: "
                           f"{', '.join([*BLOCK_AXES, *MODEL_AXES])} (per-block points take blocks)")
        if self.point in MODEL_AXES and self.point != "embed" and self.point not in model_points(model.readout):
            raise LabError(f"clamp on {self.point!r}: a {model.readout} read-out has no such point; valid "
                           f"read-out points: {', '.join(model_points(model.readout))}")
        if self.value in ("induction", "perfect_copy") and not task.query_in_context:
            raise LabError(f"a {self.value!r} clamp needs the query's class in the context; set "
                           "task.query_in_context = true")
        if self.value == "perfect_copy":
            self._check_source(model)
            return
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
        if self.value == "previous_token_input" and (not self.blocks or 0 in self.blocks):
            raise LabError("a 'previous_token_input' clamp computes a block's scores from the previous block's "
                           "input; give blocks >= 1 (block 0 has no previous block)")

    def _check_source(self, model: "ModelConfig") -> None:
        """A perfect copy's ``blocks`` / ``heads`` name the one head whose scores it reads."""
        if len(self.blocks) != 1 or len(self.heads) != 1:
            raise LabError(f"a 'perfect_copy' clamp reads one head's scores; give blocks = [b] and heads = [h], "
                           f"got blocks {list(self.blocks)}, heads {list(self.heads)}")
        if self.blocks[0] >= model.n_blocks or self.heads[0] >= model.n_heads:
            raise LabError(f"a 'perfect_copy' clamp reads block {self.blocks[0]}, head {self.heads[0]}: out of "
                           f"range (the model has {model.n_blocks} blocks of {model.n_heads} heads)")

    def _check_circuit(self, model: "ModelConfig") -> None:
        if len(self.blocks) > 1 or any(b >= model.n_blocks for b in self.blocks):
            raise LabError(f"circuit {self.circuit} takes one block (the induction head's) below "
                           f"{model.n_blocks}, got {list(self.blocks)}")
        block = self.blocks[0] if self.blocks else model.n_blocks - 1
        if self.circuit == "A" and block == 0:
            raise LabError("circuit A idealises the output of the block before the induction head's; the "
                           "induction head's block must be >= 1")
        if self.circuit == "A" and self.heads:
            raise LabError("circuit A idealises a whole block's output; leave its heads empty")
        if self.circuit == "C" and len(self.heads) != 1:
            raise LabError(f"circuit C copies from one induction head; give heads = [h], got {list(self.heads)}")

    @property
    def axes(self) -> tuple[int, int | None, int | None] | None:
        """(dims, head axis, position axis) of the point's value; None for an unknown point."""
        return BLOCK_AXES.get(self.point, MODEL_AXES.get(self.point))

    def mask(self, model: "ModelConfig", task: "TaskConfig") -> torch.Tensor | None:
        """The boolean mask (broadcastable to the point's value) of the entries to overwrite; None: all."""
        dims, head_axis, position_axis = self.axes
        positions = (task.seq_len - 1,) if self.value == "induction" else self.positions
        if self.value == "perfect_copy" or (not self.heads and not positions):
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
        """A fixed value's target: a number, a tensor broadcasting to the point's value, or a function of the value
        (computed values come from :func:`applied`)."""
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


def perfect_copy_logits(scores: torch.Tensor, head: int, context_labels: torch.Tensor,
                        n_labels: int) -> torch.Tensor:
    """(R, B, L) logits of a perfect copy from ``head`` of a block's ``scores`` (R, B, H, S, S): each context
    label's logit is the head's score from the query (last row) to that label's position (1, 3, .., 2N - 1),
    log-sum-exp over positions sharing a label; labels absent from the context get :data:`ABSENT_LOGIT`."""
    query_row = scores[:, :, head, -1, 1::2]  # (R, B, N)
    present = F.one_hot(context_labels, n_labels).bool()  # (R, B, N, L)
    absent = torch.tensor(ABSENT_LOGIT, dtype=scores.dtype, device=scores.device)
    return torch.where(present, query_row.unsqueeze(-1), absent).logsumexp(dim=2)


def shifted_to_previous(states: torch.Tensor) -> torch.Tensor:
    """``states`` (R, B, S, d) with every position but the first and the last holding its predecessor's state."""
    return torch.cat([states[:, :, :1], states[:, :, :-2], states[:, :, -1:]], dim=2)


def _previous_token_input_scores(model: "LabTransformer", block: int, batch: "Batch") -> torch.Tensor:
    """Block ``block``'s scores from an extra pass in which block ``block - 1``'s output is its own input shifted
    by one position (:func:`shifted_to_previous`)."""
    source, scores = model.state_names()[block - 1], f"blocks.{block}.attn.scores"
    with model.hooks.cache([source, scores], detach=False) as cache, \
            model.hooks.clamp(f"blocks.{block - 1}.resid_post", lambda _: shifted_to_previous(cache[source]),
                              detach=False):
        model(batch.tokens)
    return cache[scores]


def _extra_pass_values(model: "LabTransformer", specs: Sequence[ClampSpec],
                       batch: "Batch") -> dict[tuple[str, str], torch.Tensor]:
    """Run the extra forward passes ``specs`` need (none unless a spec is ``preserve`` or
    ``previous_token_input``) and return their values by (value, point name)."""
    n_blocks = model.config.n_blocks
    values: dict[tuple[str, str], torch.Tensor] = {}
    preserved = list(dict.fromkeys(name for spec in specs if spec.value == "preserve" for name in spec.names(n_blocks)))
    if preserved:
        with model.hooks.cache(preserved, detach=False) as cache:
            model(batch.tokens, query_only=not model.needs_all_positions())
        values.update({("preserve", name): cache[name] for name in preserved})
    for spec in specs:
        for block in spec.blocks if spec.value == "previous_token_input" else ():
            key = ("previous_token_input", f"blocks.{block}.attn.scores")
            if key not in values:
                values[key] = _previous_token_input_scores(model, block, batch)
    return values


def _copy_target(scores: dict[str, torch.Tensor], source: str, head: int,
                 batch: "Batch") -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda logits: perfect_copy_logits(scores[source], head, batch.context_labels, logits.shape[-1])


@contextmanager
def applied(model: "LabTransformer", specs: Sequence[ClampSpec], batch: "Batch",
            task: "TaskConfig") -> Iterator[None]:
    """Attach ``specs`` (circuits expanded, in order; perfect copies last, so they read their head's scores as the
    other clamps leave them) to ``model`` for the forward pass of ``batch`` within the ``with`` block, after
    running the extra passes that computed values need."""
    plain = [part for spec in specs for part in spec.expand(model.config)]
    plain.sort(key=lambda spec: spec.value == "perfect_copy")
    extra = _extra_pass_values(model, plain, batch)
    with ExitStack() as stack:
        for spec in plain:
            mask = spec.mask(model.config, task)
            for name in spec.names(model.config.n_blocks):
                if spec.value == "perfect_copy":
                    source = f"blocks.{spec.blocks[0]}.attn.scores"
                    scores = stack.enter_context(model.hooks.cache([source], detach=False))
                    target: Any = _copy_target(scores, source, spec.heads[0], batch)
                elif spec.value in COMPUTED:
                    target = extra[spec.value, name]
                else:
                    target = spec.target(batch, task)
                stack.enter_context(model.hooks.clamp(name, target, mask, detach=spec.value not in COMPUTED))
        yield
