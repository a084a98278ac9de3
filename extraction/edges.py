"""Attention-edge knockout between position groups, through the model's own attention mask.

**Direction.** An edge ``A -> B`` is information flowing from the positions of group A to those of group B: B is
the *receiver* (the query side of attention), A the *sender* (the key side). Knocking it out means the receivers
stop reading the senders: for every (receiver, sender) pair of the edge, in every block of a window (all heads or
chosen heads), the pre-softmax attention score is set to minus infinity and the remaining weights renormalise.

**Edge types** (:data:`EDGE_TYPES`; groups from :mod:`extraction.positions`, ``i``/``j`` demonstration indices):

================  ==========  ==========  ==========================================================
name              sender      receiver    pairs
================  ==========  ==========  ==========================================================
``y->x``          y_i         x_j         j > i (contextualization of later inputs by earlier outputs)
``y->y``          y_i         y_j         j > i
``x->y``          x_i         y_i         same demonstration (within-example)
``y->final``      every y_i   final       aggregation of the outputs at the answer position
``x->final``      every x_i   final
``query->final``  query x     final
================  ==========  ==========  ==========================================================

**How.** Each decoder layer passes an ``attention_mask`` keyword to its attention module; a forward pre-hook on the
attention modules of the window replaces it by the same mask with the edge's pairs masked out (an additive float
mask, as the eager path uses, gets the dtype's minimum there, exactly what the model's own causal masking writes;
a boolean mask, as SDPA gets, gets False). With chosen heads the mask becomes per head, (B, H, T, T), which the
eager and SDPA paths broadcast over the query heads (also with grouped-query attention, where they repeat the
key/value heads). A mask that is None (SDPA with no padding and no window in reach: plain causal attention) is
replaced by the causal boolean mask. Soft-capped scores (Gemma 2) are capped before the mask is added, so the blocked
entries vanish all the same; sliding windows are already part of each layer's mask. Nothing of the attention is
re-implemented. A receiver never loses its own position (pairs are never diagonal), so no row is left without keys.

>>> EDGE_TYPES["y->x"].pairs_text
'y_i -> x_j (j > i)'

Use::

    extract(loaded, "store.zarr", setting="ko_y->final_10-12",
            intervention=EdgeKnockout("y->final", blocks=range(10, 13)))
    with EdgeKnockout("y->x", blocks=[0, 1]).applied(loaded, Batch(ids, mask, groups)):
        logits = loaded.model(input_ids=ids, attention_mask=mask).logits
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from extraction.architecture import Architecture
from extraction.errors import InterventionError
from extraction.interventions import Batch, Intervention, _json_record
from extraction.positions import PositionGroups

#: Attention implementations whose attention module reads the mask this module edits.
MASKED_IMPLEMENTATIONS = ("eager", "sdpa")
DIRECTION = "A->B: receivers B (attention queries) stop reading senders A (attention keys)"
RELATIONS = ("any", "later", "same")


@dataclass(frozen=True)
class EdgeType:
    """Senders of group ``sender`` to receivers of group ``receiver``; ``relation`` between their demonstrations:
    ``later`` (receiver's j > sender's i), ``same`` (j == i) or ``any``."""

    name: str
    sender: str
    receiver: str
    relation: str
    pairs_text: str

    def pairs(self, groups: PositionGroups) -> torch.Tensor:
        """(B, T, T) bool: [row, receiver position, sender position] pairs of this edge (causal, never diagonal)."""
        receive, send = groups.mask(self.receiver), groups.mask(self.sender)
        pairs = receive[:, :, None] & send[:, None, :]
        demo_r, demo_s = groups.demo[:, :, None], groups.demo[:, None, :]
        if self.relation == "later":
            pairs &= demo_r > demo_s
        elif self.relation == "same":
            pairs &= demo_r == demo_s
        length = pairs.shape[-1]
        return pairs & torch.ones(length, length, dtype=torch.bool).tril(-1)


#: The edge types, by name (see the module docstring).
EDGE_TYPES: dict[str, EdgeType] = {edge.name: edge for edge in (
    EdgeType("y->x", "output", "input", "later", "y_i -> x_j (j > i)"),
    EdgeType("y->y", "output", "output", "later", "y_i -> y_j (j > i)"),
    EdgeType("x->y", "input", "output", "same", "x_i -> y_i"),
    EdgeType("y->final", "output", "final", "any", "y_i -> final"),
    EdgeType("x->final", "input", "final", "any", "x_i -> final"),
    EdgeType("query->final", "query", "final", "any", "query input -> final"),
)}


def edge_type(name: str) -> EdgeType:
    """The edge type called ``name``, or an InterventionError listing the known ones."""
    if name not in EDGE_TYPES:
        raise InterventionError(f"unknown edge type {name!r}; use one of {', '.join(EDGE_TYPES)}")
    return EDGE_TYPES[name]


def edge_pairs(edge: EdgeType, groups: PositionGroups) -> torch.Tensor:
    """The edge's (B, T, T) pairs; an InterventionError when a prompt has none (an empty position group)."""
    pairs = edge.pairs(groups)
    empty = np.flatnonzero(~pairs.flatten(1).any(1).numpy())
    if len(empty):
        raise InterventionError(f"edge {edge.name} ({edge.pairs_text}) connects no positions in prompt row "
                                f"{int(empty[0])} of the batch: its groups are empty there; use prompts with enough "
                                "shots (y->x and y->y need at least 2)")
    return pairs


def check_blocks(arch: Architecture, blocks: Sequence[int]) -> list[int]:
    """Validated, sorted, de-duplicated block indices, or an InterventionError naming the model's range."""
    if blocks is None or len(blocks) == 0:
        raise InterventionError("the block window is empty; give at least one block")
    if any(not isinstance(b, numbers.Integral) or isinstance(b, bool) for b in blocks):
        raise InterventionError(f"blocks are ints, not {list(blocks)!r}")
    outside = [int(b) for b in blocks if not 0 <= b < arch.n_layers]
    if outside:
        raise InterventionError(f"block(s) {outside} are outside the model's blocks 0..{arch.n_layers - 1}; "
                                "choose a window inside them")
    return sorted({int(b) for b in blocks})


def check_masked_attention(arch: Architecture) -> None:
    """Refuse attention implementations that do not read an attention mask tensor (flash, flex)."""
    used = getattr(getattr(arch.attentions[0], "config", None), "_attn_implementation", None)
    if used not in MASKED_IMPLEMENTATIONS:
        raise InterventionError(f"edge interventions need eager or SDPA attention, not {used!r}; load the model with "
                                "attn_implementation='eager' or 'sdpa'")


def knocked_out(mask: torch.Tensor | None, blocked: torch.Tensor) -> torch.Tensor:
    """``mask`` (an attention module's: additive float, boolean keep-mask, or None = causal) with ``blocked``
    (B, 1|H, T, T) entries masked out."""
    blocked = blocked.to(mask.device if mask is not None else blocked.device)
    if mask is None:
        length = blocked.shape[-1]
        mask = torch.ones(length, length, dtype=torch.bool, device=blocked.device).tril()[None, None]
    if mask.dtype == torch.bool:
        return mask & ~blocked
    return mask.masked_fill(blocked, torch.finfo(mask.dtype).min)


def per_head(pairs: torch.Tensor, heads: Sequence[int] | None, n_heads: int) -> torch.Tensor:
    """(B, 1, T, T) blocked entries for all heads, or (B, H, T, T) blocked for ``heads`` only."""
    if heads is None:
        return pairs[:, None]
    chosen = torch.zeros(n_heads, dtype=torch.bool)
    chosen[list(heads)] = True
    return pairs[:, None] & chosen[None, :, None, None]


def install_mask_edit(arch: Architecture, blocks: Sequence[int], blocked: Callable[[], torch.Tensor],
                      stack: ExitStack) -> None:
    """Pre-hooks on the attention modules of ``blocks`` that mask out ``blocked()`` (B, 1|H, T, T); undone by
    ``stack``."""

    def hook(module, args, kwargs):
        if "attention_mask" not in kwargs:
            raise InterventionError(f"the attention module {type(module).__name__} receives no attention_mask "
                                    "keyword, so edge interventions cannot reach it in this architecture")
        return args, {**kwargs, "attention_mask": knocked_out(kwargs["attention_mask"], blocked())}

    for block in blocks:
        stack.callback(arch.attentions[block].register_forward_pre_hook(hook, with_kwargs=True).remove)


class EdgeKnockout(Intervention):
    """Block the attention edge ``edge`` (a name in :data:`EDGE_TYPES`) in ``blocks`` (block indices 0..L-1), for
    all heads or the query heads ``heads`` (indices 0..H-1, in every block of the window).

    It needs the prompts' position groups: ``extract`` passes them; around your own forward passes give them to
    :meth:`applied` as ``Batch(input_ids, attention_mask, groups)`` (``groups`` from ``encode(...).groups``).
    """

    kind = "edge_knockout"
    usage: ClassVar[str] = "EdgeKnockout(edge, blocks=range(first, last + 1), heads=None)"

    def __init__(self, edge: str, blocks: Sequence[int], heads: Sequence[int] | None = None, *,
                 origin: Mapping[str, Any] | None = None):
        self.edge = edge_type(edge)
        self.blocks = list(blocks)
        if heads is not None and (len(heads) == 0 or any(not isinstance(h, numbers.Integral) for h in heads)):
            raise InterventionError(f"heads are query-head indices (ints), or None for all heads; not {heads!r}")
        self.heads = None if heads is None else sorted({int(h) for h in heads})
        self.origin = _json_record(origin)

    def check(self, arch: Architecture) -> None:
        self.blocks = check_blocks(arch, self.blocks)
        check_masked_attention(arch)
        if self.heads is not None and not all(0 <= h < arch.n_heads for h in self.heads):
            raise InterventionError(f"heads {self.heads} are outside 0..{arch.n_heads - 1}")

    def install(self, arch: Architecture, batch: Batch | None, stack: ExitStack) -> None:
        if batch is None or batch.groups is None:
            raise InterventionError("an edge knockout needs the prompts' position groups: pass it to extract(), or "
                                    "give applied() a Batch(input_ids, attention_mask, encode(...).groups)")
        blocked = per_head(edge_pairs(self.edge, batch.groups), self.heads, arch.n_heads)
        install_mask_edit(arch, self.blocks, lambda: blocked, stack)

    def settings(self) -> dict[str, Any]:
        return {"edge": self.edge.name, "pairs": self.edge.pairs_text, "blocks": self.blocks, "heads": self.heads,
                "direction": DIRECTION}

    @classmethod
    def from_record(cls, record: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> EdgeKnockout:
        return cls(record["edge"], record["blocks"], record["heads"], origin=record.get("origin"))
