"""Attention edges between position groups: knockout through the model's own attention mask, and counterfactual
patching from a donor prompt (:class:`EdgePatch`, :func:`patched_edge`) through an extended key set.

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

**Patching** (:class:`EdgePatch`) replaces what flows along the edge instead of blocking it: the receivers read
the keys and values of their senders from a *donor* run (a prompt with other demonstrations, shuffled labels or
another task; :mod:`extraction.donors`), through the model's own attention module run on an extended key set
(see :func:`patched_edge`). Its record keeps the donor spec, from which a group's prompts rebuild the donors.

Use::

    extract(loaded, "store.zarr", setting="ko_y->final_10-12",
            intervention=EdgeKnockout("y->final", blocks=range(10, 13)))
    extract(loaded, "store.zarr", setting="patch_y->final_10-12",
            intervention=EdgePatch("y->final", blocks=range(10, 13), donor="shuffled"))
    with EdgeKnockout("y->x", blocks=[0, 1]).applied(loaded, Batch(ids, mask, groups)):
        logits = loaded.model(input_ids=ids, attention_mask=mask).logits
    patch = EdgePatch("y->x", blocks=[0, 1], heads=[2], donor="demos:1")
    patch.prepare(loaded, task, prompts)                     # the PromptSet the rows come from
    with patch.applied(loaded, Batch(ids, mask, groups, tuple(rows))):  # rows: their Prompt objects
        logits = loaded.model(input_ids=ids, attention_mask=mask).logits
    with patched_edge(loaded, "y->final", range(10, 13), base, donor):   # your own donor: Batch with groups
        logits = loaded.model(input_ids=base.input_ids, attention_mask=base.attention_mask).logits
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from extraction.architecture import Architecture
from extraction.donors import DonorSpec, donor_prompts
from extraction.errors import InterventionError
from extraction.interventions import Batch, Intervention, json_record, architecture_of
from extraction.positions import KIND_CODES, PositionGroups
from extraction.prompts import Prompt, PromptSet, encode
from extraction.tasks import Task

#: Attention implementations whose attention module reads the mask this module edits.
MASKED_IMPLEMENTATIONS = ("eager", "sdpa")
DIRECTION = "A->B: receivers B (attention queries) stop reading senders A (attention keys)"
PATCH_DIRECTION = ("A->B: receivers B (attention queries) read the keys and values of senders A from the donor run "
                   "(its attention inputs at the aligned donor positions, at the base positions)")
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
                                "attn_implementation='eager' or 'sdpa' (--attn-implementation, [model] "
                                "attn_implementation)")


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


def chosen_heads(heads: Sequence[int] | None, n_heads: int) -> torch.Tensor | None:
    """(H,) bool of the chosen query heads, or None for all heads."""
    if heads is None:
        return None
    chosen = torch.zeros(n_heads, dtype=torch.bool)
    chosen[list(heads)] = True
    return chosen


def per_head(pairs: torch.Tensor, heads: Sequence[int] | None, n_heads: int) -> torch.Tensor:
    """(B, 1, T, T) blocked entries for all heads, or (B, H, T, T) blocked for ``heads`` only."""
    chosen = chosen_heads(heads, n_heads)
    return pairs[:, None] if chosen is None else pairs[:, None] & chosen[None, :, None, None]


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


def query_heads(heads: Sequence[int] | None) -> list[int] | None:
    """Sorted, de-duplicated query-head indices, or None (all heads); an InterventionError for anything else."""
    if heads is None:
        return None
    if len(heads) == 0 or any(not isinstance(h, numbers.Integral) or isinstance(h, bool) for h in heads):
        raise InterventionError(f"heads are query-head indices (ints), or None for all heads; not {heads!r}")
    return sorted({int(h) for h in heads})


def check_heads(arch: Architecture, heads: Sequence[int] | None) -> list[int] | None:
    """:func:`query_heads`, also refused outside the model's query heads."""
    heads = query_heads(heads)
    if heads is not None and not all(0 <= h < arch.n_heads for h in heads):
        raise InterventionError(f"heads {heads} are outside 0..{arch.n_heads - 1}")
    return heads


class _EdgeIntervention(Intervention):
    """What an edge knockout and an edge patch share: the edge type, the block window and the chosen heads."""

    #: What the intervention does to an edge A -> B (recorded).
    direction: ClassVar[str]

    def __init__(self, edge: str, blocks: Sequence[int], heads: Sequence[int] | None,
                 origin: Mapping[str, Any] | None):
        self.edge = edge_type(edge)
        self.blocks = list(blocks)
        self.heads = query_heads(heads)
        self.origin = json_record(origin)

    def check(self, arch: Architecture) -> None:
        self.blocks = check_blocks(arch, self.blocks)
        check_masked_attention(arch)
        check_heads(arch, self.heads)

    def _pairs(self, batch: Batch | None) -> torch.Tensor:
        if batch is None or batch.groups is None:
            raise InterventionError(f"an {self.kind.replace('_', ' ')} needs the prompts' position groups: pass it "
                                    "to extract(), or give applied() a Batch(input_ids, attention_mask, "
                                    "encode(...).groups)")
        return edge_pairs(self.edge, batch.groups)

    def settings(self) -> dict[str, Any]:
        return {"edge": self.edge.name, "pairs": self.edge.pairs_text, "blocks": self.blocks, "heads": self.heads,
                "direction": self.direction}


class EdgeKnockout(_EdgeIntervention):
    """Block the attention edge ``edge`` (a name in :data:`EDGE_TYPES`) in ``blocks`` (block indices 0..L-1), for
    all heads or the query heads ``heads`` (indices 0..H-1, in every block of the window).

    It needs the prompts' position groups: ``extract`` passes them; around your own forward passes give them to
    :meth:`applied` as ``Batch(input_ids, attention_mask, groups)`` (``groups`` from ``encode(...).groups``).
    """

    kind = "edge_knockout"
    direction = DIRECTION
    usage: ClassVar[str] = "EdgeKnockout(edge, blocks=range(first, last + 1), heads=None)"

    def __init__(self, edge: str, blocks: Sequence[int], heads: Sequence[int] | None = None, *,
                 origin: Mapping[str, Any] | None = None):
        super().__init__(edge, blocks, heads, origin)

    def install(self, arch: Architecture, batch: Batch | None, stack: ExitStack) -> None:
        blocked = per_head(self._pairs(batch), self.heads, arch.n_heads)
        install_mask_edit(arch, self.blocks, lambda: blocked, stack)

    @classmethod
    def from_record(cls, record: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> EdgeKnockout:
        return cls(record["edge"], record["blocks"], record["heads"], origin=record.get("origin"))


# --- counterfactual patching ---------------------------------------------------------------------------------------


def aligned_positions(base: PositionGroups, donor: PositionGroups, row: int, positions: Sequence[int]) -> list[int]:
    """The donor positions matching base ``positions`` of ``row``: the k-th token of a group (kind, demonstration)
    in the base is the k-th token of the same group in the donor. Refused when a group's token counts differ."""
    found = []
    for position in positions:
        kind, demo = int(base.kind[row, position]), int(base.demo[row, position])
        same_base = torch.nonzero((base.kind[row] == kind) & (base.demo[row] == demo)).flatten()
        same_donor = torch.nonzero((donor.kind[row] == kind) & (donor.demo[row] == demo)).flatten()
        if len(same_base) != len(same_donor):
            name = next(k for k, code in KIND_CODES.items() if code == kind)
            raise InterventionError(
                f"the {name} group{f' of demonstration {demo + 1}' if demo >= 0 else ''} is {len(same_base)} "
                f"token(s) in base row {row} but {len(same_donor)} in its donor, so their positions cannot be "
                "aligned; use donors whose groups tokenize to the same number of tokens (e.g. donor 'shuffled')")
        found.append(int(same_donor[int(torch.nonzero(same_base == position)[0, 0])]))
    return found


@dataclass
class PatchPlan:
    """Where an edge is patched in a batch of R rows: its pairs (R, T, T); per row the sender positions
    ``index`` (R, m), padded with 0 where ``valid`` is False; the aligned donor positions ``donor_index`` (R, m);
    the receivers that read each sender ``reads`` (R, T, m); the chosen query heads (H,) bool, or None for all."""

    pairs: torch.Tensor
    index: torch.Tensor
    valid: torch.Tensor
    donor_index: torch.Tensor
    reads: torch.Tensor
    heads: torch.Tensor | None = None


def patch_plan(pairs: torch.Tensor, base: PositionGroups, donor: PositionGroups,
               heads: torch.Tensor | None = None) -> PatchPlan:
    """The plan for ``pairs`` of prompts with groups ``base``, row r reading donor row r (groups ``donor``)."""
    senders = [torch.nonzero(pairs[row].any(0)).flatten().tolist() for row in range(pairs.shape[0])]
    width = max(len(s) for s in senders)
    index = torch.zeros(len(senders), width, dtype=torch.long)
    valid = torch.zeros(len(senders), width, dtype=torch.bool)
    donor_index = torch.zeros_like(index)
    for row, positions in enumerate(senders):
        index[row, :len(positions)] = torch.tensor(positions)
        valid[row, :len(positions)] = True
        donor_index[row, :len(positions)] = torch.tensor(aligned_positions(base, donor, row, positions))
    rows = torch.arange(len(senders))[:, None, None]
    reads = pairs[rows, torch.arange(pairs.shape[1])[None, :, None], index[:, None, :]] & valid[:, None, :]
    return PatchPlan(pairs, index, valid, donor_index, reads, heads)


def _keep(mask: torch.Tensor | None, length: int, device) -> torch.Tensor:
    """An attention mask as a boolean keep-mask (B|1, 1, T, T)."""
    if mask is None:
        return torch.ones(length, length, dtype=torch.bool, device=device).tril()[None, None]
    if mask.dtype == torch.bool:
        return mask[..., :length]
    return mask[..., :length] > torch.finfo(mask.dtype).min / 2


def _gather_positions(value: Any, index: torch.Tensor, length: int) -> Any:
    """Each per-position tensor (dim 1 of size ``length``) extended by its entries at ``index`` (B, m)."""
    if isinstance(value, (tuple, list)):
        return type(value)(_gather_positions(item, index, length) for item in value)
    if not torch.is_tensor(value) or value.ndim < 2 or value.shape[1] != length:
        return value
    expanded = value.expand(index.shape[0], *value.shape[1:])
    rows = torch.arange(index.shape[0], device=value.device)[:, None]
    return torch.cat([expanded, expanded[rows, index.to(value.device)]], 1)


def _extended_mask(mask: torch.Tensor | None, plan: PatchPlan) -> torch.Tensor:
    """(R, 1|H, T + m, T + m): base keys as before except the edge's pairs; column T + j open to the receivers of
    sender j (where the base mask let them see it); the added rows see only themselves. Heads not chosen keep the
    base mask and never see the added columns."""
    batch, length, m = plan.reads.shape
    device = plan.pairs.device
    keep = _keep(mask, length, device).expand(batch, 1, length, length)
    clean = torch.zeros(batch, 1, length + m, length + m, dtype=torch.bool, device=device)
    clean[:, :, :length, :length] = keep
    clean[:, 0, length:, length:] = torch.eye(m, dtype=torch.bool, device=device)
    out = clean.clone()
    out[:, :, :length, :length] &= ~plan.pairs[:, None]
    rows = torch.arange(batch, device=device)[:, None]
    seen = keep[:, 0].transpose(1, 2)[rows, plan.index].transpose(1, 2)  # (R, T, m): receiver may see sender j
    out[:, 0, :length, length:] = plan.reads & seen & plan.valid[:, None, :]
    if plan.heads is not None:
        out = torch.where(plan.heads.to(device)[None, :, None, None], out, clean)
    if mask is not None and mask.dtype != torch.bool:
        return torch.zeros(out.shape, dtype=mask.dtype, device=device).masked_fill(~out, torch.finfo(mask.dtype).min)
    return out


def _patch_hooks(arch: Architecture, block: int, plan: PatchPlan, donor_inputs: torch.Tensor,
                 stack: ExitStack) -> None:
    """Give block ``block``'s attention the extended key set: base positions plus the donor's attention inputs
    ``donor_inputs`` (R, m, d) at the plan's senders (see :func:`patched_edge`)."""
    length = plan.pairs.shape[-1]

    def extend(module, args, kwargs):
        if "attention_mask" not in kwargs:
            raise InterventionError(f"the attention module {type(module).__name__} receives no attention_mask "
                                    "keyword, so edge interventions cannot reach it in this architecture")
        hidden = args[0] if args else kwargs["hidden_states"]
        hidden = torch.cat([hidden, donor_inputs.to(hidden.device, hidden.dtype)], 1)
        others = {key: value for key, value in kwargs.items() if key not in ("hidden_states", "attention_mask")}
        others = {key: _gather_positions(value, plan.index, length) for key, value in others.items()}
        mask = _extended_mask(kwargs["attention_mask"], plan)
        if args:
            return (hidden, *args[1:]), {**others, "attention_mask": mask}
        return args, {**others, "hidden_states": hidden, "attention_mask": mask}

    def cut(module, args, kwargs, output):
        if isinstance(output, tuple):
            return (output[0][:, :length], *output[1:])
        return output[:, :length]

    attention = arch.attentions[block]
    stack.callback(attention.register_forward_pre_hook(extend, with_kwargs=True).remove)
    stack.callback(attention.register_forward_hook(cut, with_kwargs=True).remove)


def install_patch(arch: Architecture, blocks: Sequence[int], plan: PatchPlan, donor_inputs: Mapping[int, torch.Tensor],
                  stack: ExitStack, donor_rows: torch.Tensor | None = None) -> None:
    """Patch ``plan`` in ``blocks`` from the donor run's attention inputs (block -> (B, T_donor, d)); plan row r
    reads donor row ``donor_rows[r]`` (default r). Undone by ``stack``."""
    for block in blocks:
        inputs = donor_inputs[block]
        device = inputs.device
        rows = torch.arange(len(plan.index)) if donor_rows is None else donor_rows
        gathered = inputs[rows.to(device)[:, None], plan.donor_index.to(device)]
        moved = PatchPlan(*(None if t is None else t.to(device) for t in (plan.pairs, plan.index, plan.valid,
                                                                          plan.donor_index, plan.reads, plan.heads)))
        _patch_hooks(arch, block, moved, gathered, stack)


@torch.no_grad()
def attention_inputs(model: torch.nn.Module, arch: Architecture, blocks: Sequence[int], batch: Batch
                     ) -> dict[int, torch.Tensor]:
    """The attention modules' input hidden states at ``blocks`` in a run of ``batch`` (the donor's run)."""
    seen: dict[int, torch.Tensor] = {}

    def keep(block: int):
        def hook(module, args, kwargs):
            seen[block] = (args[0] if args else kwargs["hidden_states"]).detach()
        return hook

    with ExitStack() as stack:
        for block in blocks:
            stack.callback(arch.attentions[block].register_forward_pre_hook(keep(block), with_kwargs=True).remove)
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    return seen


@contextmanager
def patched_edge(loaded: Any, edge: str, blocks: Sequence[int], base: Batch, donor: Batch,
                 heads: Sequence[int] | None = None) -> Iterator[None]:
    """Forward passes of ``base`` inside the block read the edge's senders from ``donor`` (row r of ``donor`` for row
    r of ``base``) in ``blocks``, all heads or the query heads ``heads``: counterfactual patching of an attention
    edge with donor prompts of your own (:class:`EdgePatch` is the recorded form, its donors rebuilt from a spec).

    For every receiver of the edge, the keys and values at its senders are the donor's: the attention module of each
    block of the window gets an extended key set, the base positions plus one entry per sender position whose input
    is the donor run's attention input at the aligned donor position (:func:`aligned_positions`: the k-th token of
    group y_i in the base reads the k-th token of y_i in the donor; prompts of different lengths align that way,
    and groups of different token counts are refused). The receivers see the donor entries instead of the base
    senders (the mask hides the base pairs and opens the added columns only to their receivers, in the chosen
    heads); every other position attends as before. The added entries take the base sender's position (its rotary
    angle), so a receiver reads the donor's content at the base distance. The donor runs once, on entry. Nothing of
    the attention is re-implemented: the model's own module (eager or SDPA) runs on the extended inputs, and only
    the base positions of its output are kept.

    >>> with patched_edge(loaded, "y->final", range(10, 13), base, donor):       # doctest: +SKIP
    ...     logits = loaded.model(input_ids=base.input_ids, attention_mask=base.attention_mask).logits
    """
    arch = architecture_of(loaded)
    blocks = check_blocks(arch, list(blocks))
    check_masked_attention(arch)
    heads = check_heads(arch, heads)
    if base.groups is None or donor.groups is None:
        raise InterventionError("patching needs both batches' position groups: Batch(ids, mask, encode(...).groups)")
    if base.input_ids.shape[0] != donor.input_ids.shape[0]:
        raise InterventionError(f"the donor batch has {donor.input_ids.shape[0]} rows for the base's "
                                f"{base.input_ids.shape[0]}; give one donor prompt per base prompt")
    plan = patch_plan(edge_pairs(edge_type(edge), base.groups), base.groups, donor.groups,
                      chosen_heads(heads, arch.n_heads))
    inputs = attention_inputs(getattr(loaded, "model", loaded), arch, blocks, donor)
    with ExitStack() as stack:
        install_patch(arch, blocks, plan, inputs, stack)
        yield


class EdgePatch(_EdgeIntervention):
    """Patch the attention edge ``edge`` in ``blocks`` (block indices 0..L-1), for all heads or the query heads
    ``heads``, from donor prompts: the edge's receivers read the keys and values of their senders from a donor run
    (the mechanism of :func:`patched_edge`). ``donor`` is a spec (:mod:`extraction.donors`: ``shuffled``,
    ``demos:SEED``, ``task:NAME``) from which every base prompt's donor is rebuilt; the record keeps the spec, so a
    group's own prompts and its record rebuild its donors exactly (:meth:`donors`).

    ``extract`` prepares it with the run's prompts, which also checks before anything runs that every donor aligns
    with its base prompt on the edge's senders. Around your own forward passes call :meth:`prepare` first, then
    :meth:`applied` with ``Batch(ids, mask, encoded.groups, tuple(prompts))``. The donor runs once per batch, under
    the interventions listed before this one in the run (none in a run of this one alone).
    """

    kind = "edge_patch"
    direction = PATCH_DIRECTION
    usage: ClassVar[str] = "EdgePatch(edge, blocks=range(first, last + 1), heads=None, donor='shuffled')"

    def __init__(self, edge: str, blocks: Sequence[int], heads: Sequence[int] | None = None,
                 donor: str | DonorSpec = "shuffled", *, origin: Mapping[str, Any] | None = None):
        super().__init__(edge, blocks, heads, origin)
        self.donor = DonorSpec.parse(donor)
        self._loaded: Any = None
        self._donors: dict[Prompt, Prompt] = {}

    def prepare(self, loaded: Any, task: Task, prompts: PromptSet) -> None:
        """Build the donor of every prompt of ``prompts`` (the set ``task`` built) and check that they align."""
        self.bind(loaded)
        self._donors = dict(zip(prompts.prompts, donor_prompts(self.donor, task, prompts)))
        arch = architecture_of(loaded)
        base = encode(loaded.tokenizer, prompts.prompts, max_length=arch.max_context)
        donors = encode(loaded.tokenizer, self.donors(prompts.prompts), max_length=arch.max_context)
        patch_plan(edge_pairs(self.edge, base.groups), base.groups, donors.groups)

    def bind(self, loaded: Any) -> None:
        """Run the donors on ``loaded``: the model of the process that applies the patch."""
        self._loaded = loaded

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (for a Dask worker) with its donors but without the model: the worker binds its own copy."""
        return {**self.__dict__, "_loaded": None}

    def donors(self, prompts: Sequence[Prompt]) -> list[Prompt]:
        """The donor prompt of each of ``prompts`` (prompts of the prepared set)."""
        if self._loaded is None:
            raise InterventionError("an edge patch builds its donors from the run's prompts: pass it to extract(), "
                                    "or call prepare(loaded, task, prompts) before applied()")
        missing = [p.query_index for p in prompts if p not in self._donors]
        if missing:
            raise InterventionError(f"prompts with queries {missing[:5]} are not among the prompts the patch was "
                                    "prepared with; call prepare() with the prompt set they come from")
        return [self._donors[p] for p in prompts]

    def install(self, arch: Architecture, batch: Batch | None, stack: ExitStack) -> None:
        pairs = self._pairs(batch)
        if batch.prompts is None:
            raise InterventionError("an edge patch needs the rows' prompts to build their donors: give applied() a "
                                    "Batch(input_ids, attention_mask, encoded.groups, tuple(prompts))")
        prompts = self.donors(batch.prompts)
        donors = encode(self._loaded.tokenizer, prompts, max_length=arch.max_context)
        model = getattr(self._loaded, "model", self._loaded)
        device = next(model.parameters()).device
        donor = Batch(donors.input_ids.to(device), donors.attention_mask.to(device), donors.groups)
        plan = patch_plan(pairs, batch.groups, donor.groups, chosen_heads(self.heads, arch.n_heads))
        inputs = attention_inputs(model, arch, self.blocks, donor)
        install_patch(arch, self.blocks, plan, inputs, stack)

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "donor": self.donor.text, "donor_prompts": self.donor.about}

    @classmethod
    def from_record(cls, record: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> EdgePatch:
        return cls(record["edge"], record["blocks"], record["heads"], record["donor"], origin=record.get("origin"))
