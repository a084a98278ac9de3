"""Single-head ablation sweep: the effect of zero-ablating each head alone on the label logits at the query.

Quantities (label words' logits at the final position; c* the gold class):

* ``logit_diff`` of a prompt = logit(c*) - max over the other label words' logits (> 0 exactly when the
  label-restricted prediction is right); the variable ``logit_diff`` is its mean over prompts under ablation minus
  the same mean without ablation (negative: the head helps).
* ``accuracy``: label-restricted accuracy (argmax over the label words) under ablation; ``accuracy_change`` is it
  minus the clean accuracy.

Methods, which give the same numbers (checked in the tests and the benchmark):

* ``naive``: one full forward pass per head, ablated with :func:`heads.ablate`, logits of the last position only.
* ``fast``: one clean pass per batch records every decoder layer's input and call arguments (masks, position
  embeddings...). For each layer l, the batch is stacked with one copy per head of l (copy j ablates head j), and
  only blocks l..L-1 are re-run from the recorded input of block l, with the recorded arguments repeated for the
  copies. Layers below l are never recomputed (about half the work of the naive loop, more as l grows), and only the
  label words' logits are computed, through the model's one read-out (:class:`extraction.readout.Readout`: final
  norm, their LM head rows, the output scaling and soft-capping the config declares). The read-out is checked
  against the model's own logits on every batch's clean pass.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
import torch
import xarray as xr
from tqdm.auto import tqdm

from extraction.architecture import Architecture
from extraction.capture import forward_last
from extraction.models import LoadedModel
from extraction.tasks import Task
from heads.errors import HeadsError
from heads.interventions import ablate, check_heads, head_patch_hook
from heads.prompting import PromptBatches, prompt_batches
from heads.rerun import LayerCalls, call_layer, recorded_input
from heads.selection import Head

log = logging.getLogger(__name__)

METHODS = ("fast", "naive")
READOUT_TOLERANCE = 1e-3


def logit_diff(label_logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per prompt: gold label logit minus the largest other label logit, over the last axis (classes)."""
    gold = np.take_along_axis(label_logits, labels[..., None], axis=-1)[..., 0]
    others = label_logits.copy()
    np.put_along_axis(others, labels[..., None], -np.inf, axis=-1)
    return gold - others.max(axis=-1)


def check_readout(read: torch.Tensor, own: torch.Tensor) -> None:
    """Refuse a fast method whose read-out of the last state (``read``) differs from the model's logits (``own``)."""
    error = (read - own).abs().max().item()
    if error > READOUT_TOLERANCE * (1 + own.abs().max().item()):
        raise HeadsError(f"the fast method's label read-out differs from the model's logits by {error:.2e}; "
                         "this architecture post-processes its logits in a way the read-out does not know: "
                         "use method='naive'")


@torch.no_grad()
def _run_from(arch: Architecture, calls: LayerCalls, start: int, heads: list[int], prompts: torch.Tensor,
              batch: int) -> torch.Tensor:
    """Final states at the last position, (len(prompts) * len(heads), d): blocks start..L-1 re-run from block
    ``start``'s recorded input for the batch rows ``prompts``, copy j of each with head ``heads[j]`` of ``start``
    zeroed."""
    copies = len(heads)
    keep = torch.ones(copies, arch.n_heads)
    keep[torch.arange(copies), heads] = 0
    rows = prompts.repeat_interleave(copies)
    handle = arch.output_projections[start].register_forward_pre_hook(
        head_patch_hook(arch, keep.repeat(len(prompts), 1)))
    try:
        hidden = recorded_input(calls.calls[start], rows)
        for index in range(start, arch.n_layers):
            hidden = call_layer(arch.layers[index], hidden, calls.calls[index], batch, rows)
    finally:
        handle.remove()
    return hidden[:, -1]


def _by_layer(heads: list[Head]) -> dict[int, list[int]]:
    layers: dict[int, list[int]] = {}
    for layer, head in heads:
        layers.setdefault(layer, []).append(head)
    return layers


def _fast(loaded: LoadedModel, reference: PromptBatches, heads: list[Head], rows_per_pass: int, progress: bool):
    arch = loaded.arch

    def readout(states: torch.Tensor) -> torch.Tensor:
        return arch.readout(states, reference.label_tokens).cpu()

    by_layer = _by_layer(heads)
    n = len(reference.prompts.prompts)
    clean = np.zeros((n, len(reference.label_tokens)), np.float32)
    ablated = {head: np.zeros_like(clean) for head in heads}
    bar = tqdm(total=len(reference.batches) * len(by_layer), desc="sweep (fast)", unit="layer", disable=not progress)
    for index, encoded in reference.batches:
        ids, mask = encoded.input_ids.to(loaded.device), encoded.attention_mask.to(loaded.device)
        calls = LayerCalls(arch)
        with calls.recording():
            own = forward_last(loaded.model, ids, mask)[:, reference.label_tokens].cpu()
        clean[index] = own.numpy()
        check_readout(readout(calls.final), own)
        for layer, layer_heads in by_layer.items():
            step = max(1, rows_per_pass // len(layer_heads))
            for first in range(0, len(index), step):
                prompts = torch.arange(first, min(first + step, len(index)))
                logits = readout(_run_from(arch, calls, layer, layer_heads, prompts, len(index)))
                logits = logits.view(len(prompts), len(layer_heads), -1)
                for j, head in enumerate(layer_heads):
                    ablated[(layer, head)][index[first:first + step]] = logits[:, j].numpy()
            bar.update()
    bar.close()
    return clean, ablated


@torch.no_grad()
def _naive(loaded: LoadedModel, reference: PromptBatches, heads: list[Head], rows_per_pass: int,
           progress: bool):
    def run() -> np.ndarray:
        out = np.zeros((len(reference.prompts.prompts), len(reference.label_tokens)), np.float32)
        for index, encoded in reference.batches:
            logits = forward_last(loaded.model, encoded.input_ids.to(loaded.device),
                                  encoded.attention_mask.to(loaded.device))
            out[index] = logits[:, reference.label_tokens].cpu().numpy()
        return out

    clean, ablated = run(), {}
    for head in tqdm(heads, desc="sweep (naive)", unit="head", disable=not progress):
        with ablate(loaded, [head]):
            ablated[head] = run()
    return clean, ablated


def sweep(
    loaded: LoadedModel,
    *,
    task: str | Task = "sentiment",
    shots: int = 8,
    n: int = 64,
    seed: int = 0,
    method: str = "fast",
    heads: Sequence[Head] | None = None,
    batch_size: int = 8,
    progress: bool = True,
    **prompt_options: Any,
) -> xr.Dataset:
    """Zero-ablate each head alone (all heads, or ``heads``) on ``n`` ``shots``-shot prompts; see module docstring.

    Returns a Dataset over (block, head) with ``logit_diff``, ``accuracy`` and ``accuracy_change`` (NaN for heads
    not swept), plus ``label_logits`` (block, head, example, class) and ``clean_label_logits`` (example, class).
    ``batch_size`` is the rows of one forward pass: prompts for the naive method and for the fast method's clean
    pass; the fast method's re-runs stack one copy per head of a layer, ``batch_size // heads`` prompts at a time.
    """
    if method not in METHODS:
        raise HeadsError(f"unknown sweep method {method!r}; use one of {', '.join(METHODS)}")
    arch = loaded.arch
    heads = check_heads(arch, heads if heads is not None else [(l, h) for l in range(arch.n_layers)
                                                               for h in range(arch.n_heads)])
    reference = prompt_batches(loaded, task=task, shots=shots, n=n, seed=seed, batch_size=batch_size, **prompt_options)
    log.info("sweeping %d heads on %d %d-shot prompts (%s method)", len(heads), n, shots, method)
    clean, ablated = (_fast if method == "fast" else _naive)(loaded, reference, heads, batch_size, progress)
    labels = reference.prompts.labels
    classes = list(reference.prompts.label_words)
    clean_diff = float(logit_diff(clean, labels).mean())
    clean_accuracy = float((clean.argmax(-1) == labels).mean())
    logits = np.full((arch.n_layers, arch.n_heads, n, len(classes)), np.nan, np.float32)
    diff = np.full((arch.n_layers, arch.n_heads), np.nan, np.float32)
    accuracy = np.full_like(diff, np.nan)
    for (layer, head), values in ablated.items():
        logits[layer, head] = values
        diff[layer, head] = logit_diff(values, labels).mean() - clean_diff
        accuracy[layer, head] = (values.argmax(-1) == labels).mean()
    return xr.Dataset(
        {
            "logit_diff": (("block", "head"), diff),
            "accuracy": (("block", "head"), accuracy),
            "accuracy_change": (("block", "head"), accuracy - np.float32(clean_accuracy)),
            "label_logits": (("block", "head", "example", "class"), logits),
            "clean_label_logits": (("example", "class"), clean),
            "label": (("example",), labels),
        },
        coords={"block": np.arange(arch.n_layers), "head": np.arange(arch.n_heads), "class": classes},
        attrs={"method": method, "clean_logit_diff": clean_diff, "clean_accuracy": clean_accuracy,
               "prompts": reference.config(), "ablation": "zero, one head at a time, every position",
               "logit_diff": "mean over prompts of gold label logit - max other label logit, ablated minus clean",
               "accuracy": "label-restricted (argmax over the label words), under ablation"},
    )
