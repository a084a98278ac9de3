"""Edge scans on string-to-string pair tasks: the first answer token under each knockout, and exact generation.

The scan of :mod:`heads.flow` (the same edge types, windows and ``fast``/``naive`` methods, which give the same
numbers) over pair prompts (:mod:`extraction.pair_tasks`: ``France -> Paris``, answers of several tokens). Per cell
(edge type, window), over the prompts, each with a bootstrap percentile interval (``*_low``, ``*_high``):

* ``accuracy``: the top-1 token at the final position (whole vocabulary) is the gold answer's first token, read in
  context (:func:`extraction.pair_tasks.answer_tokens`); ``accuracy_change`` is it minus the clean run's;
* ``logit_change``: that token's logit under knockout minus clean;
* ambiguous tasks, per reading ``r`` (``past_tense``, ``copying``...): ``reading_<r>``, the top-1 token is the
  first token of r's answer (and its change); two readings sharing a first token both count it;
* ``exact`` (and ``exact_<r>``), only for the cells asked for in ``generate`` (NaN elsewhere; greedy generation of
  the whole answer costs one full pass per written token): the generated answer equals the gold one (r's), and the
  change from the clean run.

The clean run's exact accuracy (and each reading's) is always measured: ``clean_exact`` per prompt and the attrs
``clean_exact_accuracy`` / ``clean_exact_<r>``. Generation under a knockout blocks the edge for every token the
model writes (they join the final group; see :mod:`extraction.pair_eval`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from typing import Any, Sequence

import numpy as np
import xarray as xr

from extraction.edges import DIRECTION, EDGE_TYPES, EdgeKnockout
from extraction.models import LoadedModel
from extraction.pair_eval import EXTRA_TOKENS, greedy_generate, stop_strings
from extraction.pair_tasks import PairPrompt, PairPromptConfig, PairTask, answer_tokens, build_pair_prompts, \
    load_pair_task
from extraction.prompts import Encoded, PromptConfig, encode
from geometry.bootstrap import CI_LEVEL
from heads.errors import HeadsError
from heads.flow_runs import Cells, Knockouts, run_fast, run_naive, summaries

log = logging.getLogger(__name__)

#: Prompt options of classification tasks that pair prompts do not have (refused unless left at their defaults).
_CLASSIFICATION_ONLY = {f.name: f.default for f in fields(PromptConfig)
                        if f.name not in ("shots", "n", "seed", "template", "separator")}


@dataclass
class PairBatches:
    """Pair prompts in batches of similar length, as the scan's runners read them (``batches``, ``label_tokens``).

    ``tracked`` (n, 1 + readings) holds each prompt's answer first tokens: the gold one, then each reading's;
    ``label_tokens`` the distinct tracked tokens, whose logits the runners keep; ``longest`` the most tokens of any
    of the answers.
    """

    task: PairTask
    prompts: list[PairPrompt]
    config: PairPromptConfig
    tracked: np.ndarray
    label_tokens: list[int]
    longest: int
    batches: list[tuple[np.ndarray, Encoded]]

    def rows(self, index: np.ndarray) -> tuple[PairPrompt, ...]:
        """The prompts of examples ``index`` (a batch's rows)."""
        return tuple(self.prompts[i] for i in index)

    def columns(self) -> np.ndarray:
        """(n, 1 + readings): where each tracked token sits in ``label_tokens``."""
        return np.searchsorted(self.label_tokens, self.tracked)

    def describe(self) -> dict[str, Any]:
        """JSON-ready description of the prompts (stored with the scan)."""
        return {"task": self.task.name, **self.config.to_dict(), "template": self.task.template,
                "separator": self.task.separator}


def pair_batches(loaded: LoadedModel, task: str | PairTask, *, shots: int, n: int, seed: int, batch_size: int,
                 template: str | None = None, separator: str = "\n") -> PairBatches:
    """Seeded pair prompts of ``task`` (a built-in name, a file or a :class:`PairTask`), their answers' tokens and
    their encoded batches (position groups included)."""
    if batch_size < 1:
        raise HeadsError(f"batch_size must be >= 1, not {batch_size}")
    task = task if isinstance(task, PairTask) else load_pair_task(task, template=template, separator=separator)
    config = PairPromptConfig(shots=shots, n=n, seed=seed)
    prompts = build_pair_prompts(task, config)
    answers = [[answer_tokens(loaded.tokenizer, p), *(answer_tokens(loaded.tokenizer, p, value)
                                                      for value in p.readings.values())] for p in prompts]
    tracked = np.array([[tokens[0] for tokens in row] for row in answers], dtype=np.int64)
    lengths = np.array([len(ids) for ids in loaded.tokenizer([p.text for p in prompts])["input_ids"]])
    order = np.argsort(lengths, kind="stable")
    batches = []
    for start in range(0, n, batch_size):
        index = np.sort(order[start:start + batch_size])
        batches.append((index, encode(loaded.tokenizer, [prompts[i] for i in index],
                                      max_length=loaded.arch.max_context)))
    return PairBatches(task, prompts, config, tracked, sorted(set(tracked.ravel().tolist())),
                       max(len(tokens) for row in answers for tokens in row), batches)


def _exact(loaded: LoadedModel, reference: PairBatches, batch_size: int, knockout: EdgeKnockout | None = None
           ) -> np.ndarray:
    """(1 + readings, n) float: greedy generation (under ``knockout``) gives the gold answer, then each reading's."""
    made = greedy_generate(loaded, reference.prompts, stops=stop_strings(reference.task.separator),
                           max_new_tokens=reference.longest + EXTRA_TOKENS,
                           interventions=[knockout] if knockout else [], batch_size=batch_size)
    answers = [[p.answer, *p.readings.values()] for p in reference.prompts]
    return np.array([[g.text == a.strip() for a in row] for g, row in zip(made, answers)], dtype=float).T


def _generated_cells(generate: Sequence[tuple[str, int]], names: list[str], spans: list[tuple[int, ...]]
                     ) -> list[tuple[int, int]]:
    """(edge index, window index) of each (edge, first block) asked for; a HeadsError for one outside the scan."""
    firsts = [span[0] for span in spans]
    cells = []
    for edge, first in generate:
        if edge not in names or first not in firsts:
            raise HeadsError(f"cannot generate under {edge} in the window starting at block {first}: the scan has "
                             f"the edges {', '.join(names)} and windows starting at blocks {firsts[0]}..{firsts[-1]}")
        cells.append((names.index(edge), firsts.index(first)))
    return cells


def pair_edge_scan(
    loaded: LoadedModel,
    *,
    task: str | PairTask,
    names: list[str],
    spans: list[tuple[int, ...]],
    shots: int = 8,
    n: int = 32,
    seed: int = 0,
    method: str = "fast",
    batch_size: int = 8,
    n_boot: int = 1000,
    progress: bool = True,
    generate: Sequence[tuple[str, int]] = (),
    **prompt_options: Any,
) -> xr.Dataset:
    """The edge scan of a pair task (see the module docstring), called by :func:`heads.flow.edge_scan` with the
    checked edge ``names`` and window ``spans``; ``generate`` lists (edge, first block) cells whose whole answers
    are generated under the knockout. ``prompt_options``: ``template`` (``{input}``/``{output}``), ``separator``.
    """
    given = {key: value for key, value in prompt_options.items()
             if key in _CLASSIFICATION_ONLY and value != _CLASSIFICATION_ONLY[key]}
    unknown = sorted(set(prompt_options) - set(_CLASSIFICATION_ONLY) - {"template", "separator"})
    if given or unknown:
        raise HeadsError(f"{', '.join(sorted(given) + unknown)} do not apply to the pair task {task!r}; pair "
                         "prompts take a template with {input} and {output} and a separator")
    generated = _generated_cells(generate, names, spans)
    reference = pair_batches(loaded, task, shots=shots, n=n, seed=seed, batch_size=batch_size,
                             template=prompt_options.get("template"),
                             separator=prompt_options.get("separator") or "\n")
    readings = list(reference.task.readings)
    cells = Cells(len(names), len(spans), n, len(reference.label_tokens))
    log.info("scanning %d edge types x %d windows on %d %d-shot prompts of %s (%s)", len(names), len(spans), n,
             shots, reference.task.name, method)
    if method == "fast":
        run_fast(loaded, reference, names, spans, cells, lambda index, encoded: Knockouts(loaded, encoded, names),
                 progress)
    else:
        run_naive(loaded, reference, names, spans, cells, EdgeKnockout, progress)
    columns = reference.columns()
    tracked = np.take_along_axis(cells.label_logits, np.broadcast_to(columns, cells.label_logits.shape[:2]
                                                                     + columns.shape), axis=-1)
    clean_tracked = np.take_along_axis(cells.clean_label_logits, columns, axis=-1)
    gold = reference.tracked[:, 0]
    values = {"accuracy": (cells.top_token == gold).astype(float),
              "logit_change": tracked[..., 0] - clean_tracked[:, 0]}
    clean = {"accuracy": (cells.clean_top_token == gold).astype(float)}
    for r, name in enumerate(readings, start=1):
        values[f"reading_{name}"] = (cells.top_token == reference.tracked[:, r]).astype(float)
        clean[f"reading_{name}"] = (cells.clean_top_token == reference.tracked[:, r]).astype(float)
    clean_exact = _exact(loaded, reference, batch_size)
    exact_names = ["exact", *(f"exact_{name}" for name in readings)]
    if generated:
        exact = np.full((len(exact_names), len(names), len(spans), n), np.nan)
        for e, w in generated:
            exact[:, e, w] = _exact(loaded, reference, batch_size, EdgeKnockout(names[e], spans[w]))
        values.update(zip(exact_names, exact))
        clean.update(zip(exact_names, clean_exact))
    summary = summaries(values, clean, np.zeros(n, dtype=int), n_boot, seed)
    answers = ["gold", *readings]
    return xr.Dataset(
        {
            **summary,
            "answer_logits": (("edge", "window", "example", "answer"), tracked),
            "top_token": (("edge", "window", "example"), cells.top_token),
            "clean_answer_logits": (("example", "answer"), clean_tracked),
            "clean_top_token": (("example",), cells.clean_top_token),
            "answer_token": (("example", "answer"), reference.tracked),
            "clean_exact": (("example",), clean_exact[0]),
        },
        coords={"edge": names, "window": [s[0] for s in spans], "window_last": ("window", [s[-1] for s in spans]),
                "answer": answers, "pairs": ("edge", [EDGE_TYPES[name].pairs_text for name in names])},
        attrs={"kind": "pair", "mode": "knockout", "donor": "", "method": method, "width": len(spans[0]), "direction": DIRECTION,
               "ci_level": CI_LEVEL, "n_boot": n_boot, "readings": readings,
               "clean_accuracy": float(clean["accuracy"].mean()),
               "clean_exact_accuracy": float(clean_exact[0].mean()),
               **{f"clean_reading_{name}": float(clean[f"reading_{name}"].mean()) for name in readings},
               **{f"clean_exact_{name}": float(clean_exact[r].mean()) for r, name in enumerate(readings, start=1)},
               "generated_cells": [f"{names[e]}@{spans[w][0]}" for e, w in generated],
               "prompts": reference.describe(),
               "knockout": "pre-softmax score -inf, all heads, every block of the window",
               "about_accuracy": "the top-1 token (whole vocabulary) is the gold answer's first token",
               "about_logit_change": "the gold answer's first token's logit, knocked out minus clean",
               "panel_accuracy_change": "accuracy change (answer's first token)",
               "panel_logit_change": "gold answer's first-token logit change"},
    )
