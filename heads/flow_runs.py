"""The two ways an edge scan runs its (edge type, window) cells, ``naive`` and ``fast`` (see :mod:`heads.flow`), and
the bootstrap summaries of their per-prompt values: shared by the classification scan (:mod:`heads.flow`) and the
pair-task scan (:mod:`heads.pair_flow`).

A runner reads prompts from a reference (``batches`` of (example index, encoded prompts), ``label_tokens`` whose
logits it keeps, ``rows(index)``) and fills a :class:`Cells` with the final position's logits of the clean run and
of every cell.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from extraction.capture import forward_last
from extraction.edges import EDGE_TYPES, attention_inputs, edge_pairs, install_mask_edit, install_patch, patch_plan
from extraction.interventions import Batch, Intervention
from extraction.models import LoadedModel
from extraction.positions import PositionGroups
from extraction.prompts import Encoded, Prompt, encode
from geometry.bootstrap import CI_LEVEL, resample_counts
from heads.prompting import PromptBatches
from heads.rerun import LayerCalls, call_layer, recorded_input
from heads.sweeps import check_readout


class Cells:
    """Final-position logits of every (edge, window, example): label words' logits and whole-vocabulary top-1."""

    def __init__(self, n_edges: int, n_windows: int, n: int, classes: int):
        self.label_logits = np.zeros((n_edges, n_windows, n, classes), np.float32)
        self.top_token = np.zeros((n_edges, n_windows, n), np.int64)
        self.clean_label_logits = np.zeros((n, classes), np.float32)
        self.clean_top_token = np.zeros(n, np.int64)

    def put(self, edge: int, window: int, index: np.ndarray, logits: torch.Tensor, tokens: list[int]) -> None:
        """Record the final-position ``logits`` of examples ``index`` in cell (edge, window)."""
        self.label_logits[edge, window, index] = logits[:, tokens].numpy()
        self.top_token[edge, window, index] = logits.argmax(-1).numpy()


def _batch(reference: PromptBatches, index: np.ndarray, encoded: Encoded, device) -> Batch:
    return Batch(encoded.input_ids.to(device), encoded.attention_mask.to(device), encoded.groups,
                 reference.rows(index))


@torch.no_grad()
def run_naive(loaded: LoadedModel, reference: PromptBatches, edges: list[str], spans: list[tuple[int, ...]],
              cells: Cells, cell: Callable[[str, tuple[int, ...]], Intervention], progress: bool) -> None:
    """Fill ``cells`` with one full forward pass per batch and cell, the cell's intervention from ``cell(edge,
    blocks)`` applied."""
    bar = tqdm(total=len(reference.batches) * (1 + len(edges) * len(spans)), desc="flow (naive)", disable=not progress)
    interventions = {(edge, blocks): cell(edge, blocks) for edge in edges for blocks in spans}
    for index, encoded in reference.batches:
        batch = _batch(reference, index, encoded, loaded.device)
        logits = forward_last(loaded.model, batch.input_ids, batch.attention_mask).cpu()
        cells.clean_label_logits[index] = logits[:, reference.label_tokens].numpy()
        cells.clean_top_token[index] = logits.argmax(-1).numpy()
        bar.update()
        for e, edge in enumerate(edges):
            for w, blocks in enumerate(spans):
                with interventions[edge, blocks].applied(loaded, batch):
                    logits = forward_last(loaded.model, batch.input_ids, batch.attention_mask).cpu()
                cells.put(e, w, index, logits, reference.label_tokens)
                bar.update()
    bar.close()


class Knockouts:
    """Fast-method edits of a batch stacked with one copy per edge: copy (prompt p, edge e) = row p * E + e has edge
    e knocked out."""

    def __init__(self, loaded: LoadedModel, encoded: Encoded, edges: list[str]):
        self.blocked = _stacked_pairs(encoded, edges)[:, None].to(loaded.device)
        self.arch = loaded.arch

    def install(self, blocks: Sequence[int], stack: ExitStack) -> None:
        install_mask_edit(self.arch, blocks, lambda: self.blocked, stack)


class Patches:
    """Fast-method edits of the stacked batch (see :class:`Knockouts`): copy (p, e) reads edge e's senders from
    prompt p's donor, whose every block's attention input is recorded in one donor pass."""

    def __init__(self, loaded: LoadedModel, encoded: Encoded, edges: list[str], donors: list[Prompt]):
        arch = self.arch = loaded.arch
        donor = encode(loaded.tokenizer, donors, max_length=arch.max_context)
        self.inputs = attention_inputs(loaded.model, arch, range(arch.n_layers),
                                       Batch(donor.input_ids.to(loaded.device), donor.attention_mask.to(loaded.device)))
        self.rows = torch.arange(len(donors)).repeat_interleave(len(edges))
        self.plan = patch_plan(_stacked_pairs(encoded, edges), _rows(encoded.groups, self.rows),
                               _rows(donor.groups, self.rows))

    def install(self, blocks: Sequence[int], stack: ExitStack) -> None:
        install_patch(self.arch, blocks, self.plan, self.inputs, stack, donor_rows=self.rows)


def _stacked_pairs(encoded: Encoded, edges: list[str]) -> torch.Tensor:
    """(B * E, T, T): the pairs of edge e for prompt p at row p * E + e."""
    return torch.stack([edge_pairs(EDGE_TYPES[edge], encoded.groups) for edge in edges], 1).flatten(0, 1)


def _rows(groups: PositionGroups, rows: torch.Tensor) -> PositionGroups:
    return PositionGroups(groups.kind[rows], groups.demo[rows])


@torch.no_grad()
def run_fast(loaded: LoadedModel, reference: PromptBatches, edges: list[str], spans: list[tuple[int, ...]],
             cells: Cells, edits: Callable[[np.ndarray, Encoded], Knockouts | Patches], progress: bool) -> None:
    """Fill ``cells`` with one recorded clean pass per batch; per window, the batch stacked with one copy per edge
    re-runs only the blocks from the window's first, ``edits(index, encoded)`` installed in the window's blocks."""
    arch = loaded.arch
    bar = tqdm(total=len(reference.batches) * len(spans), desc="flow (fast)", unit="window", disable=not progress)
    for index, encoded in reference.batches:
        batch = _batch(reference, index, encoded, loaded.device)
        calls = LayerCalls(arch)
        with calls.recording():
            own = forward_last(loaded.model, batch.input_ids, batch.attention_mask).cpu()
        check_readout(arch.readout(calls.final, reference.label_tokens).cpu(), own[:, reference.label_tokens])
        cells.clean_label_logits[index] = own[:, reference.label_tokens].numpy()
        cells.clean_top_token[index] = own.argmax(-1).numpy()
        size = len(index)
        batch_edits = edits(index, encoded)
        rows = torch.arange(size).repeat_interleave(len(edges))  # copy (prompt p, edge e) is row p * len(edges) + e
        for w, blocks in enumerate(spans):
            first = blocks[0]
            hidden = recorded_input(calls.calls[first], rows)
            with ExitStack() as stack:
                batch_edits.install(blocks, stack)
                for block in range(first, arch.n_layers):
                    hidden = call_layer(arch.layers[block], hidden, calls.calls[block], size, rows)
            logits = arch.readout(hidden[:, -1]).cpu().view(size, len(edges), -1)
            for e in range(len(edges)):
                cells.put(e, w, index, logits[:, e], reference.label_tokens)
            bar.update()
    bar.close()


def summaries(values: dict[str, np.ndarray], clean: dict[str, np.ndarray], labels: np.ndarray, n_boot: int,
              seed: int) -> dict[str, tuple[tuple[str, ...], np.ndarray]]:
    """Means over prompts (last axis) of each per-prompt quantity, changes from clean, and bootstrap intervals."""
    counts = resample_counts(labels, n_boot, np.random.default_rng(seed)) / len(labels)  # (n_boot, n)
    tail = 100 * (1 - CI_LEVEL) / 2
    out = {}

    def add(name: str, per_prompt: np.ndarray) -> None:
        out[name] = (("edge", "window"), per_prompt.mean(-1))
        low, high = np.percentile(per_prompt @ counts.T, [tail, 100 - tail], axis=-1)
        out[f"{name}_low"], out[f"{name}_high"] = (("edge", "window"), low), (("edge", "window"), high)

    for name, per_prompt in values.items():
        add(name, per_prompt)
        if name in clean:
            add(f"{name}_change", per_prompt - clean[name])
    return out


