"""Position groups of an ICL prompt: which tokens write each demonstration's input x_i and output y_i, the glue
between them, the query input and the final position.

A prompt is built from *segments*, character spans of its text that each belong to one group (see
:func:`prompt_segments`). After tokenization every token gets the group of the segments its characters cover
(:func:`token_groups`), as two integer arrays: the group ``kind`` (codes in :data:`KIND_CODES`) and the demonstration
index ``demo`` (0-based; -1 for groups outside the demonstrations). A token that covers characters of several
segments gets the one of highest :data:`PRIORITY` (content before glue: a byte-level BPE token ``" positive"``
covers the template's space and the label word, and is y_i). Padding is ``-1`` in both arrays.

Code table (stored in a store group's attrs as ``position_kinds``):

======  ==============  =============================================================
code    kind            tokens
======  ==============  =============================================================
-1      ``pad``         padding (and nothing else)
0       ``special``     tokens that cover no text (BOS)
1       ``input``       demonstration i's input text x_i
2       ``output``      demonstration i's output (label word) y_i
3       ``template``    template words around x_i / y_i and the query (``Sentiment:``)
4       ``separator``   the separator after demonstration i
5       ``query``       the query's input text
6       ``final``       the last token of the prompt (where the answer is read)
======  ==============  =============================================================

Every demonstration's x_i and y_i, the query input and the final position must own at least one token: a group
that maps to no token is a :class:`~extraction.errors.PromptError` naming it (its characters went into a token of
another group, e.g. a template without a space before ``{label}``).

>>> segs = prompt_segments("{text} is {label}", "\\n", [("good film", "positive")], "bad film")
>>> [(s.kind, s.demo) for s in segs[1]]
[('input', 0), ('template', 0), ('output', 0), ('separator', 0), ('query', -1), ('template', -1)]
>>> segs[0]
'good film is positive\\nbad film is'
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from extraction.errors import PromptError

PAD, SPECIAL, INPUT, OUTPUT, TEMPLATE, SEPARATOR, QUERY, FINAL = -1, 0, 1, 2, 3, 4, 5, 6
#: Group kind name -> code stored per token.
KIND_CODES: dict[str, int] = {"pad": PAD, "special": SPECIAL, "input": INPUT, "output": OUTPUT,
                              "template": TEMPLATE, "separator": SEPARATOR, "query": QUERY, "final": FINAL}
#: Which kind a token covering several segments takes: the first of these it covers.
PRIORITY = ("output", "input", "query", "template", "separator")
#: Groups every prompt must give at least one token (per demonstration for input/output).
REQUIRED = ("input", "output", "query", "final")


@dataclass(frozen=True)
class Segment:
    """Characters ``start..end`` of a prompt's text belong to group ``kind`` of demonstration ``demo`` (-1: none)."""

    kind: str
    demo: int
    start: int
    end: int


def _template_parts(template: str) -> list[tuple[str, str]]:
    """A template as (kind, literal text or field name) parts, e.g. ``[('field', 'text'), ('literal', ' is ')...]``."""
    parts = []
    for literal, field, _, _ in string.Formatter().parse(template):
        if literal:
            parts.append(("literal", literal))
        if field is not None:
            if field not in ("text", "label"):
                raise PromptError(f"template field {{{field}}} is unknown; use {{text}} and {{label}}")
            parts.append(("field", field))
    return parts


def prompt_segments(template: str, separator: str, demos: Sequence[tuple[str, str]], query: str
                    ) -> tuple[str, tuple[Segment, ...]]:
    """The prompt ``demo_1 sep ... demo_k sep query`` and its segments.

    ``demos`` are (input text, output text) pairs; the query is the template up to ``{label}`` with trailing
    whitespace removed (the model writes the label's leading space itself).
    """
    parts = _template_parts(template)
    cut = next((i for i, part in enumerate(parts) if part == ("field", "label")), None)
    if cut is None:
        raise PromptError("the template has no {label} field")
    text, segments = [], []

    def add(kind: str, demo: int, piece: str) -> None:
        start = sum(len(t) for t in text)
        text.append(piece)
        if piece:
            segments.append(Segment(kind, demo, start, start + len(piece)))

    for i, (x, y) in enumerate(demos):
        for kind, value in parts:
            if kind == "literal":
                add("template", i, value)
            else:
                add("input" if value == "text" else "output", i, x if value == "text" else y)
        add("separator", i, separator)
    head = parts[:cut]
    for j, (kind, value) in enumerate(head):
        if kind == "field":
            add("query", -1, query)
        else:
            add("template", -1, value.rstrip() if j == len(head) - 1 else value)
    return "".join(text), tuple(segments)


@dataclass
class PositionGroups:
    """Per-token group kind and demonstration index of a batch (B, T), aligned with its token ids; -1 = padding."""

    kind: torch.Tensor
    demo: torch.Tensor

    def mask(self, kind: str) -> torch.Tensor:
        """(B, T) bool: the tokens of group ``kind``."""
        return self.kind == KIND_CODES[kind]


def token_groups(offsets: Sequence[tuple[int, int]], segments: Sequence[Segment]) -> tuple[np.ndarray, np.ndarray]:
    """Group kind codes and demo indices of one prompt's tokens, from its tokens' character ``offsets``.

    The last token that covers text is ``final``. Raises a PromptError naming a required group with no token.
    """
    n = len(offsets)
    kind = np.full(n, SPECIAL, np.int8)
    demo = np.full(n, -1, np.int16)
    rank = {name: r for r, name in enumerate(PRIORITY)}
    best = np.full(n, len(PRIORITY))
    starts = np.array([a for a, _ in offsets]) if n else np.zeros(0, int)
    ends = np.array([b for _, b in offsets]) if n else np.zeros(0, int)
    real = ends > starts
    for segment in segments:
        hit = real & (ends > segment.start) & (starts < segment.end) & (best > rank[segment.kind])
        kind[hit], demo[hit], best[hit] = KIND_CODES[segment.kind], segment.demo, rank[segment.kind]
    last = np.flatnonzero(real)
    if len(last):
        kind[last[-1]], demo[last[-1]] = FINAL, -1
    _check_required(kind, demo, segments)
    return kind, demo


def _check_required(kind: np.ndarray, demo: np.ndarray, segments: Sequence[Segment]) -> None:
    wanted = {(s.kind, s.demo) for s in segments if s.kind in REQUIRED} | {("final", -1)}
    for name, index in sorted(wanted, key=lambda item: (item[1] < 0, item[1], item[0])):
        if not np.any((kind == KIND_CODES[name]) & (demo == index)):
            where = f"of demonstration {index + 1}" if index >= 0 else "of the prompt"
            raise PromptError(f"the {name} group {where} maps to no token (its characters went into a token of "
                              "another group); put a space or other fixed text between the template's fields")


def batch_groups(offsets: torch.Tensor, attention_mask: torch.Tensor, segments: Sequence[Sequence[Segment]]
                 ) -> PositionGroups:
    """Position groups of a left-padded batch from its offset mapping (B, T, 2); padding gets -1."""
    kinds = torch.full(attention_mask.shape, PAD, dtype=torch.int8)
    demos = torch.full(attention_mask.shape, -1, dtype=torch.int16)
    for row in range(attention_mask.shape[0]):
        keep = attention_mask[row].bool()
        kind, demo = token_groups(offsets[row][keep].tolist(), segments[row])
        kinds[row, keep] = torch.from_numpy(kind)
        demos[row, keep] = torch.from_numpy(demo)
    return PositionGroups(kinds, demos)
