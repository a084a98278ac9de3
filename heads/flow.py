"""Edge scans ([B], contextualize-then-aggregate): knock out or patch each attention edge type over sliding block
windows.

For every edge type (:data:`extraction.edges.EDGE_TYPES`: ``A -> B``, senders A, receivers B) and every window of
``width`` consecutive blocks (stride 1; window ``w`` = blocks ``w .. w + width - 1``), the prompts run with the edge
intervened on in the window's blocks, all heads, and the answer is read at the final position. The intervention is
the ``mode``: ``knockout`` (receivers stop reading senders, :class:`extraction.edges.EdgeKnockout`) or ``patch``
(receivers read their senders' keys and values from a donor run, :class:`extraction.edges.EdgePatch`; the donor
prompts from a spec such as ``shuffled``, ``demos:1`` or ``task:topic``, :mod:`extraction.donors`).

* ``accuracy``: label-restricted (argmax over the label words' logits is the gold class);
* ``vocab_accuracy``: whole vocabulary (the top-1 token is the gold label word's token);
* ``logit_change``: the gold label word's logit under the intervention minus without, per prompt;

each as its mean over prompts with a stratified bootstrap percentile interval (``*_low``, ``*_high``), and the
accuracies also as changes from the clean run (``accuracy_change``, ``vocab_accuracy_change``, intervals of the
paired differences).

Methods, which give the same numbers (checked in the tests and ``benchmarks/flow.py``):

* ``naive``: one full forward pass per (edge type, window) cell with the intervention object (a patch also runs its
  donor per cell).
* ``fast``: one clean pass per batch records every decoder layer's call (as the single-head sweep does), and in
  patch mode one donor pass records every block's attention input. For window ``w`` the batch is stacked with one
  copy per edge type, and only blocks ``w .. L-1`` re-run from block ``w``'s recorded input, the window's attention
  modules getting each copy's knocked-out mask (or extended key set); nothing below the window is recomputed.
  Logits come from the model's one read-out (:class:`extraction.readout.Readout`), checked against the model's own
  logits on every clean pass.

String-to-string pair tasks (``task="country_capital"``, a :class:`~extraction.pair_tasks.PairTask` or a file with
``input``/``output`` columns) run the same scan on the answer's first token, with exact generation of the whole
answer; see :mod:`heads.pair_flow`.

>>> import heads.flow as flow
>>> flow.windows(n_blocks=4, width=3)
[(0, 1, 2), (1, 2, 3)]
"""

from __future__ import annotations

import logging
import re
from typing import Any, Sequence

import numpy as np
import pandas as pd
import xarray as xr

from extraction.donors import DonorSpec, donor_prompts
from extraction.edges import EDGE_TYPES, EdgeKnockout, EdgePatch, check_masked_attention, edge_type
from extraction.interventions import Intervention
from extraction.models import LoadedModel
from extraction.pair_tasks import PairTask, is_pair_task
from extraction.tasks import Task
from geometry.bootstrap import CI_LEVEL
from heads.errors import HeadsError
from heads.flow_runs import Cells, Knockouts, Patches, run_fast, run_naive, summaries
from heads.pair_flow import pair_edge_scan
from heads.prompting import prompt_batches
from heads.sweeps import METHODS

log = logging.getLogger(__name__)

DEFAULT_WIDTH = 3
#: Interventions a scan applies to each (edge, window) cell.
MODES = ("knockout", "patch")
DEFAULT_DONOR = "shuffled"
#: Per-prompt quantities averaged into each cell (name -> what it is).
PER_PROMPT = {
    "accuracy": "label-restricted accuracy under the intervention (argmax over the label words)",
    "vocab_accuracy": "whole-vocabulary accuracy under the intervention (top-1 token is the gold label word's token)",
    "logit_change": "gold label word's logit, intervened minus clean",
}


def parse_cell(text: str) -> tuple[str, int]:
    """A scan cell written ``EDGE@FIRST`` (``y->final@9``: the window of ``y->final`` starting at block 9)."""
    edge, _, first = text.rpartition("@")
    if not edge or not first.lstrip("-").isdigit():
        raise HeadsError(f"a cell is written EDGE@FIRST_BLOCK (the window's first block), such as y->final@9, "
                         f"not {text!r}")
    if int(first) < 0:
        raise HeadsError(f"the first block of {text!r} must be >= 0")
    return edge_type(edge).name, int(first)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text)


def knockout_group(edge: str, blocks: Sequence[int]) -> str:
    """Default group name of a knockout: ``knockout_<edge>_<first>-<last>`` with the arrow written as ``-``."""
    return f"knockout_{_slug(edge)}_{blocks[0]}-{blocks[-1]}"


def patch_group(edge: str, blocks: Sequence[int], donor: str) -> str:
    """Default group name of a patch: ``patch_<edge>_<first>-<last>_<donor>`` (arrow and colons written as ``-``)."""
    return f"patch_{_slug(edge)}_{blocks[0]}-{blocks[-1]}_{_slug(donor)}"


def windows(n_blocks: int, width: int = DEFAULT_WIDTH) -> list[tuple[int, ...]]:
    """Every window of ``width`` consecutive blocks, stride 1."""
    if not 1 <= width <= n_blocks:
        raise HeadsError(f"window width {width} does not fit the model's {n_blocks} blocks; use 1..{n_blocks}")
    return [tuple(range(first, first + width)) for first in range(n_blocks - width + 1)]


def edge_scan(
    loaded: LoadedModel,
    *,
    task: str | Task | PairTask = "sentiment",
    shots: int = 8,
    n: int = 32,
    seed: int = 0,
    edges: Sequence[str] | None = None,
    width: int = DEFAULT_WIDTH,
    method: str = "fast",
    mode: str = "knockout",
    donor: str | None = None,
    batch_size: int = 8,
    n_boot: int = 1000,
    progress: bool = True,
    generate: Sequence[tuple[str, int]] = (),
    **prompt_options: Any,
) -> xr.Dataset:
    """Knock out (``mode="knockout"``) or patch from donor prompts (``mode="patch"``, ``donor`` a spec of
    :mod:`extraction.donors`, default ``shuffled``) every edge type (all of :data:`EDGE_TYPES`, or ``edges``) over
    every window of ``width`` blocks on ``n`` seeded ``shots``-shot prompts of ``task``; see the module docstring
    for the quantities.

    Returns a Dataset over (edge, window) (coordinate ``window`` = the window's first block, ``window_last`` its last)
    with each quantity, its change, and ``*_low`` / ``*_high`` bootstrap intervals (``n_boot`` stratified
    resamples of the prompts), plus the per-prompt ``label_logits`` (edge, window, example, class), ``top_token``,
    ``clean_label_logits``, ``clean_top_token`` and ``label``. ``batch_size`` prompts run per clean pass; the fast
    method's re-runs stack ``batch_size * len(edges)`` rows.

    A pair task gives :func:`heads.pair_flow.pair_edge_scan`'s Dataset (first answer token, exact generation of the
    clean run and of the ``generate`` cells, given as (edge, first block of the window)).

    >>> ds = edge_scan(loaded, task="sentiment", shots=4, n=8, width=2)          # doctest: +SKIP
    >>> ds["accuracy_change"].sel(edge="y->final").values                   # doctest: +SKIP
    >>> flow_table(ds).head()                                               # doctest: +SKIP
    >>> edge_scan(loaded, mode="patch", donor="demos:1", edges=["y->final"])   # doctest: +SKIP
    """
    if method not in METHODS:
        raise HeadsError(f"unknown scan method {method!r}; use one of {', '.join(METHODS)}")
    if mode not in MODES:
        raise HeadsError(f"unknown scan mode {mode!r}; use one of {', '.join(MODES)}")
    if mode == "knockout" and donor is not None:
        raise HeadsError("a donor is used only by mode='patch'; drop it or pass mode='patch'")
    spec = DonorSpec.parse(donor or DEFAULT_DONOR) if mode == "patch" else None
    names = [edge_type(name).name for name in (edges if edges is not None else EDGE_TYPES)]
    if not names:
        raise HeadsError("no edge types to scan; give at least one of " + ", ".join(EDGE_TYPES))
    check_masked_attention(loaded.arch)
    spans = windows(loaded.arch.n_layers, width)
    if is_pair_task(task):
        if spec is not None:
            raise HeadsError("patching edges applies to classification tasks for now; scan the pair task "
                             f"{getattr(task, 'name', task)!r} with mode='knockout'")
        return pair_edge_scan(loaded, task=task, names=names, spans=spans, shots=shots, n=n, seed=seed,
                              method=method, batch_size=batch_size, n_boot=n_boot, progress=progress,
                              generate=generate, **prompt_options)
    if generate:
        raise HeadsError("generating whole answers applies to string-to-string pair tasks; "
                         f"{getattr(task, 'name', task)!r} is a classification task: drop generate")
    reference = prompt_batches(loaded, task=task, shots=shots, n=n, seed=seed, batch_size=batch_size,
                               **prompt_options)
    labels = reference.prompts.labels
    classes = list(reference.prompts.label_words)
    cells = Cells(len(names), len(spans), n, len(classes))
    log.info("scanning %d edge types x %d windows on %d %d-shot prompts (%s, %s)", len(names), len(spans), n, shots,
             mode, method)
    kind = EdgePatch if spec else EdgeKnockout
    if method == "naive":
        def cell(edge: str, blocks: tuple[int, ...]) -> Intervention:
            if spec is None:
                return EdgeKnockout(edge, blocks)
            patch = EdgePatch(edge, blocks, donor=spec)
            patch.prepare(loaded, reference.task, reference.prompts)
            return patch

        run_naive(loaded, reference, names, spans, cells, cell, progress)
    elif spec is None:
        run_fast(loaded, reference, names, spans, cells, lambda index, encoded: Knockouts(loaded, encoded, names),
                 progress)
    else:
        donors = donor_prompts(spec, reference.task, reference.prompts)
        run_fast(loaded, reference, names, spans, cells,
                 lambda index, encoded: Patches(loaded, encoded, names, [donors[i] for i in index]), progress)
    gold_token = np.asarray(reference.label_tokens)[labels]
    gold = np.arange(n), labels
    values = {
        "accuracy": (cells.label_logits.argmax(-1) == labels).astype(float),
        "vocab_accuracy": (cells.top_token == gold_token).astype(float),
        "logit_change": cells.label_logits[..., gold[0], gold[1]] - cells.clean_label_logits[gold],
    }
    clean = {"accuracy": (cells.clean_label_logits.argmax(-1) == labels).astype(float),
             "vocab_accuracy": (cells.clean_top_token == gold_token).astype(float)}
    summary = summaries(values, clean, labels, n_boot, seed)
    return xr.Dataset(
        {
            **summary,
            "label_logits": (("edge", "window", "example", "class"), cells.label_logits),
            "top_token": (("edge", "window", "example"), cells.top_token),
            "clean_label_logits": (("example", "class"), cells.clean_label_logits),
            "clean_top_token": (("example",), cells.clean_top_token),
            "label": (("example",), labels),
        },
        coords={"edge": names, "window": [s[0] for s in spans], "window_last": ("window", [s[-1] for s in spans]),
                "class": classes, "pairs": ("edge", [EDGE_TYPES[name].pairs_text for name in names])},
        attrs={"method": method, "mode": mode, "donor": spec.text if spec else "", "width": width,
               "direction": kind.direction, "ci_level": CI_LEVEL, "n_boot": n_boot,
               "clean_accuracy": float(clean["accuracy"].mean()),
               "clean_vocab_accuracy": float(clean["vocab_accuracy"].mean()),
               "prompts": reference.config(),
               "intervention": f"{mode}{f' from donor {spec.text} ({spec.about})' if spec else ''}: all heads, "
                               "every block of the window",
               **{f"about_{name}": text for name, text in PER_PROMPT.items()}},
    )


def flow_table(ds: xr.Dataset) -> pd.DataFrame:
    """One row per (edge, window, quantity): value and interval, with the window's first and last block and the
    scan's mode (``knockout`` or ``patch``) and donor spec (empty for knockouts)."""
    rows = []
    quantities = [name for name in ds.data_vars if f"{name}_low" in ds.data_vars]
    mode, donor = ds.attrs.get("mode", "knockout"), ds.attrs.get("donor", "")
    for edge in ds["edge"].values:
        for window, last in zip(ds["window"].values, ds["window_last"].values):
            for name in quantities:
                cell = dict(mode=mode, donor=donor, edge=str(edge), window=int(window), window_last=int(last),
                            quantity=name)
                for suffix, key in (("", "value"), ("_low", "low"), ("_high", "high")):
                    cell[key] = float(ds[name + suffix].sel(edge=edge, window=window))
                if not np.isnan(cell["value"]):  # cells a pair scan did not generate
                    rows.append(cell)
    return pd.DataFrame(rows)
