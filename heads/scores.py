"""Head scores over (block, head): the paper's previous-token (PTH) and induction (IH) scores, and classic detectors.

Index convention: head data (scores, sweeps, head sets, their tables and plots) are indexed by ``block`` b = 0..L-1,
the decoder block whose attention holds the head, and ``head`` h, the query head of that attention. Stored residual
states are indexed by ``layer`` l = 0..L (state 0 = embedding output, state l = output of block l-1), so block b
reads state ``layer=b`` and writes state ``layer=b+1``. The two names differ on purpose: xarray never aligns a head
score with a state of the same number.

Definitions (positions are 1-based in prose, counted from a prompt's first real token, so left padding never
counts; ``A_h(i -> j)`` is head h's attention weight from query position i to key position j):

* ``pth`` ([Y]): on the first ``n`` zero-shot prompts, the attention ``A_h(k -> k-1)`` summed over every position
  k >= 2 of every prompt, divided by the number of such (prompt, position) pairs. The divisor is the same for all
  heads, so the ranking is the paper's summed score; the value is a mean in [0, 1]. ``pth_first_pair=False`` starts
  at k = 3 instead, leaving out the second token's attention to the first (usually <bos>, an attention sink), as
  the classic previous-token detector does.
* ``ih`` ([Y]): on the same queries as ``shots``-shot prompts, the attention from the final position (the ':' before
  the answer) to the first token of every demonstration label, summed over the labels, averaged over prompts.
* ``previous_token``, ``induction`` (prefix matching), ``duplicate_token``: on ``n_random`` sequences
  ``<bos> r_1..r_R r_1..r_R`` of R seeded random non-special tokens, the mean over the second copy (positions
  p = R+2..2R+1 counting <bos> as 1) of the attention to p-1, to the token after the earlier occurrence (p-R+1) and to
  the earlier occurrence itself (p-R); ``previous_token`` averages over every position from 3 on (position 2's
  previous token is <bos>, an attention sink for many heads).

Attention weights come from one extra forward pass with the eager attention implementation (the only one that
returns them); the model's own implementation is restored afterwards, so extraction keeps its fast kernel. Each
block's weights (batch, head, query, key) are reduced to what the scores need by a forward hook on its attention
module as soon as they are computed, and dropped there (:func:`reduce_attention`): only one block's weights exist
at a time, so memory does not grow with depth. With grouped-query attention the weights are per query head, which
is what a head index means everywhere in the toolkit.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import xarray as xr
from tqdm.auto import tqdm

from extraction.capture import position_ids
from extraction.models import LoadedModel
from extraction.store import consolidate, list_groups
from extraction.tasks import Task
from heads.errors import HeadsError, ScoresClashError
from heads.prompting import prompt_batches
from heads.records import same_record

log = logging.getLogger(__name__)

SCORES = ("pth", "ih", "previous_token", "induction", "duplicate_token")
GROUP = "head_scores"
DIMS = ("block", "head")
#: Score settings added after head scores were first stored, at the value those older scores were computed with.
LEGACY_SETTINGS = {"pth_first_pair": True, "quantization": None}
DEFINITIONS = {
    "ih": "attention from the final position to the demonstrations' label tokens, summed over labels, mean over prompts",
    "previous_token": "repeated random tokens: mean attention p -> p-1 over positions p>=3 (<bos> is position 1)",
    "induction": "repeated random tokens: mean attention from the second copy to the token after the earlier occurrence",
    "duplicate_token": "repeated random tokens: mean attention from the second copy to the earlier occurrence",
}

Reduction = Callable[[torch.Tensor], dict[str, torch.Tensor]]


def pth_definition(first_pair: bool) -> str:
    """The ``pth`` score's definition for a ``pth_first_pair`` setting."""
    start = 2 if first_pair else 3
    return (f"mean over zero-shot prompts and positions k>={start} of attention k -> k-1 (ranks as the paper's sum"
            f"{'' if first_pair else ', without the second token attending to the first'})")


@contextmanager
def attention_implementation(model, name: str) -> Iterator[None]:
    """Switch ``model`` to the attention implementation ``name`` and restore its own on exit."""
    previous = model.config._attn_implementation
    if previous != name:
        model.set_attn_implementation(name)
    try:
        yield
    finally:
        if previous != name:
            model.set_attn_implementation(previous)


def eager_attention(model) -> Iterator[None]:
    """Switch ``model`` to eager attention (which returns weights) and restore its implementation on exit."""
    return attention_implementation(model, "eager")


@torch.no_grad()
def reduce_attention(loaded: LoadedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     reduce: Reduction) -> dict[str, torch.Tensor]:
    """One eager forward pass in which each block's attention weights (batch, head, query, key) go through
    ``reduce`` as soon as its attention module returns them; returns each reduced value on the CPU, stacked over
    blocks at dim 1 (batch, block, ...).

    The hook hands the block its attention output with ``None`` in place of the weights (decoder blocks discard
    them), so the weights are freed before the next block runs, and ``output_attentions`` stays off, so the model
    does not collect them either.
    """
    arch = loaded.arch
    reduced: list[dict[str, torch.Tensor] | None] = [None] * arch.n_layers

    def hook(block: int):
        def keep(module, args, output):
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if not torch.is_tensor(weights) or weights.ndim != 4:
                raise HeadsError(f"the attention of block {block} returned no (batch, head, query, key) weights in "
                                 "eager mode; head scores need an attention module that returns its weights")
            reduced[block] = {name: value.cpu() for name, value in reduce(weights).items()}
            return (output[0], None, *output[2:])
        return keep

    handles = [attention.register_forward_hook(hook(block)) for block, attention in enumerate(arch.attentions)]
    device = loaded.device
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    try:
        with eager_attention(loaded.model):
            loaded.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
                         output_attentions=False, logits_to_keep=1, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    missing = [block for block, value in enumerate(reduced) if value is None]
    if missing:
        raise HeadsError(f"the attention of block(s) {missing} did not run in the forward pass")
    return {name: torch.stack([value[name] for value in reduced], dim=1) for name in reduced[0]}


def attention_patterns(loaded: LoadedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Every block's attention weights, (batch, block, head, query, key), float32 on the CPU: for looking at the
    patterns of a few short prompts (memory grows with blocks x length^2; :func:`score` reduces each block instead)."""
    return reduce_attention(loaded, input_ids, attention_mask, lambda w: {"weights": w.float()})["weights"]


def previous_token_pairs(attention_mask: torch.Tensor, *, first_pair: bool = True) -> torch.Tensor:
    """(B, T-1) 0/1 weights of the pairs k -> k-1 that the PTH score counts: element j is the pair j+1 -> j, counted
    when both tokens are real and, without ``first_pair``, when j is not the prompt's first real token."""
    mask = attention_mask.bool()
    valid = mask[:, 1:] & mask[:, :-1]
    if not first_pair:
        valid[:, 1:] &= mask[:, :-2]
        valid[:, 0] = False
    return valid.float()


def previous_token_sums(attention: torch.Tensor, attention_mask: torch.Tensor, *,
                        first_pair: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Per prompt, summed attention k -> k-1 over the counted pairs (:func:`previous_token_pairs`) and their number.

    ``attention`` is (B, ..., T, T) (one block's weights or all blocks'); the sums are (B, ...), the counts (B,).
    """
    steps = attention.diagonal(offset=-1, dim1=-2, dim2=-1).float()  # (B, ..., T-1): element j is A(j+1 -> j)
    valid = previous_token_pairs(attention_mask, first_pair=first_pair).to(steps.device)
    shape = (valid.shape[0],) + (1,) * (steps.ndim - 2) + (valid.shape[1],)
    return (steps * valid.view(shape)).sum(-1), valid.sum(-1)


def label_attention(attention: torch.Tensor, label_positions: list[list[int]]) -> torch.Tensor:
    """Per prompt, attention from the last position to the listed label positions, summed: (B, ...) from
    (B, ..., T, T)."""
    last = attention[..., -1, :].float()  # (B, ..., T)
    weights = torch.zeros(last.shape[0], last.shape[-1], dtype=last.dtype, device=last.device)
    for row, positions in enumerate(label_positions):
        weights[row, positions] = 1.0
    return torch.einsum("b...t,bt->b...", last, weights)


def repeated_sequence_scores(attention: torch.Tensor, repeat: int) -> dict[str, torch.Tensor]:
    """Classic detector scores (B, ...) on ``<bos> r r`` sequences with ``r`` of length ``repeat``, from
    (B, ..., T, T)."""
    if attention.shape[-1] != 2 * repeat + 1:
        raise HeadsError(f"expected sequences of length 2 * {repeat} + 1, got {attention.shape[-1]}")

    def diagonal(offset: int) -> torch.Tensor:  # element j is A(j + offset -> j)
        return attention.diagonal(offset=-offset, dim1=-2, dim2=-1).float()

    return {
        "previous_token": diagonal(1)[..., 1:].mean(-1),
        "induction": diagonal(repeat - 1)[..., 2:].mean(-1),
        "duplicate_token": diagonal(repeat)[..., 1:].mean(-1),
    }


def random_repeated_tokens(tokenizer, vocab_size: int, count: int, repeat: int, seed: int) -> torch.Tensor:
    """``count`` seeded sequences ``<bos> r r`` (r: ``repeat`` random non-special tokens), (count, 2 * repeat + 1).

    A tokenizer without a <bos> token gets one more random token in its place, so the layout is the same.
    """
    special = set(tokenizer.all_special_ids)
    candidates = np.array([i for i in range(min(len(tokenizer), vocab_size)) if i not in special])
    tokens = np.random.default_rng(seed).choice(candidates, size=(count, repeat + 1))
    lead = tokens[:, :1] if tokenizer.bos_token_id is None else np.full((count, 1), tokenizer.bos_token_id)
    return torch.as_tensor(np.concatenate([lead, tokens[:, 1:], tokens[:, 1:]], axis=1), dtype=torch.long)


def _prompt_scores(loaded: LoadedModel, options: dict[str, Any], shots: int, n: int, seed: int, batch_size: int,
                   task, pth_first_pair: bool, progress: bool) -> tuple[np.ndarray, np.ndarray, dict, dict]:
    """PTH on zero-shot prompts and IH on ``shots``-shot prompts of the same queries."""
    arch = loaded.arch
    zero = prompt_batches(loaded, task=task, shots=0, n=n, seed=seed, batch_size=batch_size, **options)
    few = prompt_batches(loaded, task=task, shots=shots, n=n, seed=seed, batch_size=batch_size, **options)
    pth, count = torch.zeros(arch.n_layers, arch.n_heads), 0.0
    ih = torch.zeros(arch.n_layers, arch.n_heads)
    bar = tqdm(total=2 * n, unit="prompt", desc="head scores", disable=not progress)
    for _, encoded in zero.batches:
        mask = encoded.attention_mask
        sums = reduce_attention(loaded, encoded.input_ids, mask, lambda w: {
            "pth": previous_token_sums(w, mask, first_pair=pth_first_pair)[0]})["pth"]
        pth += sums.sum(0)
        count += float(previous_token_pairs(mask, first_pair=pth_first_pair).sum())
        bar.update(len(encoded.input_ids))
    for _, encoded in few.batches:
        positions = encoded.label_positions
        ih += reduce_attention(loaded, encoded.input_ids, encoded.attention_mask, lambda w: {
            "ih": label_attention(w, positions)})["ih"].sum(0)
        bar.update(len(encoded.input_ids))
    bar.close()
    if shots == 0:
        log.warning("ih scores on zero-shot prompts are 0: there are no demonstration labels to attend to")
    return (pth / max(count, 1.0)).numpy(), (ih / n).numpy(), zero.config(), few.config()


def _detector_scores(loaded: LoadedModel, n_random: int, repeat: int, seed: int, batch_size: int) -> dict:
    sequences = random_repeated_tokens(loaded.tokenizer, loaded.arch.vocab_size, n_random, repeat, seed)
    totals: dict[str, torch.Tensor] = {}
    for start in range(0, n_random, batch_size):
        chunk = sequences[start:start + batch_size]
        values = reduce_attention(loaded, chunk, torch.ones_like(chunk), lambda w: repeated_sequence_scores(w, repeat))
        for name, value in values.items():
            totals[name] = totals.get(name, 0) + value.sum(0)
    return {name: (total / n_random).numpy() for name, total in totals.items()}


def _score_config(loaded: LoadedModel, task, shots: int, n: int, seed: int, n_random: int, repeat: int,
                  pth_first_pair: bool, options: dict) -> dict[str, Any]:
    return {
        "task": task if isinstance(task, str) else task.name, "shots": shots, "n": n, "seed": seed,
        "n_random": n_random, "repeat": repeat, "pth_first_pair": pth_first_pair,
        "prompt_options": {k: options[k] for k in sorted(options)}, **loaded.identity,
    }


def _upgrade(dataset: xr.Dataset) -> xr.Dataset:
    """Head scores as stored by an earlier version, in today's form: the ``layer`` dimension (block indices) renamed
    ``block``, and the settings added since filled in with the values those scores were computed with."""
    if "layer" in dataset.dims:
        dataset = dataset.rename({"layer": "block"})
    config = dataset.attrs.get("config")
    if isinstance(config, dict):
        dataset.attrs["config"] = {**LEGACY_SETTINGS, **config}
    return dataset


def load_scores(store: str | Path, group: str = GROUP) -> xr.Dataset:
    """Head scores saved in a store by :func:`score`, over (block, head) (older stores' ``layer`` is renamed)."""
    if group not in list_groups(store):
        raise HeadsError(f"store {store} has no {group!r} group; run heads.score(loaded, store=...) "
                         "or `icl-geometry heads score STORE` first")
    dataset = _upgrade(xr.open_zarr(str(store), group=group, consolidated=False).load())
    return dataset[[name for name in SCORES if name in dataset]]  # the store does not keep the variables' order


def score(
    loaded: LoadedModel,
    *,
    task: str | Task = "sentiment",
    shots: int = 8,
    n: int = 50,
    seed: int = 0,
    store: str | Path | None = None,
    n_random: int = 16,
    repeat: int = 25,
    pth_first_pair: bool = True,
    batch_size: int = 8,
    overwrite: bool = False,
    progress: bool = True,
    **prompt_options: Any,
) -> xr.Dataset:
    """Score every head: ``pth``, ``ih`` and the detectors, as a Dataset over (block, head) (see module docstring).

    ``pth_first_pair`` says whether the PTH score counts the second token's attention to the first (k = 2): the
    paper's sum does (the default); ``False`` leaves that pair out, as the classic previous-token detector does.
    With ``store`` the result is saved as group ``head_scores`` and re-used when a later call has the same
    configuration (model, task, shots, n, seed, detector and PTH settings); a different configuration is refused
    unless ``overwrite``. ``prompt_options`` are the prompt settings of ``extraction.extract`` (template, ...).
    """
    if n_random < 1 or repeat < 2:
        raise HeadsError(f"n_random must be >= 1 and repeat >= 2 (got {n_random}, {repeat})")
    config = _score_config(loaded, task, shots, n, seed, n_random, repeat, pth_first_pair, prompt_options)
    if store is not None and Path(store).exists() and GROUP in list_groups(store) and not overwrite:
        saved = load_scores(store)
        if same_record(saved.attrs.get("config"), config):
            log.info("re-using head scores from %s", store)
            return saved
        raise ScoresClashError(f"store {store} holds head scores computed with another configuration "
                               f"({saved.attrs.get('config')})", path=store, group=GROUP,
                               remedy="pass overwrite=True to replace them")
    pth, ih, zero_config, few_config = _prompt_scores(loaded, prompt_options, shots, n, seed, batch_size, task,
                                                      pth_first_pair, progress)
    detectors = _detector_scores(loaded, n_random, repeat, seed, batch_size)
    arch = loaded.arch
    values = {"pth": pth, "ih": ih, **detectors}
    definitions = {"pth": pth_definition(pth_first_pair), **DEFINITIONS}
    dataset = xr.Dataset(
        {name: (DIMS, values[name].astype(np.float32), {"definition": definitions[name]}) for name in SCORES},
        coords={"block": np.arange(arch.n_layers), "head": np.arange(arch.n_heads)},
        attrs={"config": config, "zero_shot_prompts": zero_config, "icl_prompts": few_config,
               "index_convention": "block b = decoder block b (0-based; it reads stored state layer b and writes "
                                   "layer b+1); head h = query head h of its attention"},
    )
    if store is not None:
        dataset.to_zarr(str(store), group=GROUP, mode="w", consolidated=False)
        consolidate(store)
        log.info("head scores saved to %s (group %s)", store, GROUP)
    return dataset
