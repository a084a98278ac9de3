"""Head scores over (layer, head): the paper's previous-token (PTH) and induction (IH) scores, and classic detectors.

Definitions (positions are 1-based in prose, counted from a prompt's first real token, so left padding never
counts; ``A_h(i -> j)`` is head h's attention weight from query position i to key position j):

* ``pth`` ([Y]): on the first ``n`` zero-shot prompts, the attention ``A_h(k -> k-1)`` summed over every position
  k >= 2 of every prompt, divided by the number of such (prompt, position) pairs. The divisor is the same for all
  heads, so the ranking is the paper's summed score; the value is a mean in [0, 1].
* ``ih`` ([Y]): on the same queries as ``shots``-shot prompts, the attention from the final position (the ':' before
  the answer) to the first token of every demonstration label, summed over the labels, averaged over prompts.
* ``previous_token``, ``induction`` (prefix matching), ``duplicate_token``: on ``n_random`` sequences
  ``<bos> r_1..r_R r_1..r_R`` of R seeded random non-special tokens, the mean over the second copy (positions
  p = R+2..2R+1 counting <bos> as 1) of the attention to p-1, to the token after the earlier occurrence (p-R+1) and to
  the earlier occurrence itself (p-R); ``previous_token`` averages over every position from 3 on (position 2's
  previous token is <bos>, an attention sink for many heads).

Attention weights come from one extra forward pass with the eager attention implementation (the only one that
returns them); the model's own implementation is restored afterwards, so extraction keeps its fast kernel. With
grouped-query attention the weights are per query head, which is what a head index means everywhere in the toolkit.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

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
DEFINITIONS = {
    "pth": "mean over zero-shot prompts and positions k>=2 of attention k -> k-1 (ranks as the paper's sum)",
    "ih": "attention from the final position to the demonstrations' label tokens, summed over labels, mean over prompts",
    "previous_token": "repeated random tokens: mean attention p -> p-1 over positions p>=3 (<bos> is position 1)",
    "induction": "repeated random tokens: mean attention from the second copy to the token after the earlier occurrence",
    "duplicate_token": "repeated random tokens: mean attention from the second copy to the earlier occurrence",
}


@contextmanager
def eager_attention(model) -> Iterator[None]:
    """Switch ``model`` to eager attention (which returns weights) and restore its implementation on exit."""
    previous = model.config._attn_implementation
    if previous != "eager":
        model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if previous != "eager":
            model.set_attn_implementation(previous)


@torch.no_grad()
def attention_patterns(loaded: LoadedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Attention weights of every layer and query head, (batch, layer, head, query, key), float32 on the CPU."""
    device = loaded.device
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    with eager_attention(loaded.model):
        output = loaded.model(input_ids=input_ids, attention_mask=attention_mask,
                              position_ids=position_ids(attention_mask), output_attentions=True,
                              logits_to_keep=1, use_cache=False)
    if not output.attentions or len(output.attentions) != loaded.arch.n_layers:
        raise HeadsError("the model returned no attention weights with output_attentions=True in eager mode")
    return torch.stack([a.float().cpu() for a in output.attentions], dim=1)


def previous_token_sums(attention: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per prompt, summed attention k -> k-1 over real positions whose previous token is real: (B, L, H), (B,)."""
    steps = attention.diagonal(offset=-1, dim1=-2, dim2=-1)  # (B, L, H, T-1): element j is A(j+1 -> j)
    mask = attention_mask.bool()
    valid = (mask[:, 1:] & mask[:, :-1]).to(attention.dtype)
    return (steps * valid[:, None, None, :]).sum(-1), valid.sum(-1)


def label_attention(attention: torch.Tensor, label_positions: list[list[int]]) -> torch.Tensor:
    """Per prompt, attention from the last position to the listed label positions, summed: (B, L, H)."""
    last = attention[:, :, :, -1, :]  # (B, L, H, T)
    weights = torch.zeros(last.shape[0], last.shape[-1], dtype=last.dtype)
    for row, positions in enumerate(label_positions):
        weights[row, positions] = 1.0
    return torch.einsum("blht,bt->blh", last, weights)


def repeated_sequence_scores(attention: torch.Tensor, repeat: int) -> dict[str, torch.Tensor]:
    """Classic detector scores (B, L, H) on ``<bos> r r`` sequences with ``r`` of length ``repeat``."""
    if attention.shape[-1] != 2 * repeat + 1:
        raise HeadsError(f"expected sequences of length 2 * {repeat} + 1, got {attention.shape[-1]}")

    def diagonal(offset: int) -> torch.Tensor:  # element j is A(j + offset -> j)
        return attention.diagonal(offset=-offset, dim1=-2, dim2=-1)

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
                   task, progress: bool) -> tuple[np.ndarray, np.ndarray, dict, dict]:
    """PTH on zero-shot prompts and IH on ``shots``-shot prompts of the same queries."""
    arch = loaded.arch
    zero = prompt_batches(loaded, task=task, shots=0, n=n, seed=seed, batch_size=batch_size, **options)
    few = prompt_batches(loaded, task=task, shots=shots, n=n, seed=seed, batch_size=batch_size, **options)
    pth, count = torch.zeros(arch.n_layers, arch.n_heads), 0.0
    ih = torch.zeros(arch.n_layers, arch.n_heads)
    bar = tqdm(total=2 * n, unit="prompt", desc="head scores", disable=not progress)
    for _, encoded in zero.batches:
        sums, valid = previous_token_sums(attention_patterns(loaded, encoded.input_ids, encoded.attention_mask),
                                          encoded.attention_mask)
        pth += sums.sum(0)
        count += float(valid.sum())
        bar.update(len(encoded.input_ids))
    for _, encoded in few.batches:
        attention = attention_patterns(loaded, encoded.input_ids, encoded.attention_mask)
        ih += label_attention(attention, encoded.label_positions).sum(0)
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
        attention = attention_patterns(loaded, chunk, torch.ones_like(chunk))
        for name, values in repeated_sequence_scores(attention, repeat).items():
            totals[name] = totals.get(name, 0) + values.sum(0)
    return {name: (total / n_random).numpy() for name, total in totals.items()}


def _score_config(loaded: LoadedModel, task, shots: int, n: int, seed: int, n_random: int, repeat: int,
                  options: dict) -> dict[str, Any]:
    return {
        "task": task if isinstance(task, str) else task.name, "shots": shots, "n": n, "seed": seed,
        "n_random": n_random, "repeat": repeat, "prompt_options": {k: options[k] for k in sorted(options)},
        "model": loaded.provenance.get("model_spec", loaded.spec), "model_sha256": loaded.provenance.get("model_sha256"),
        "dtype": loaded.provenance.get("dtype"),
    }


def load_scores(store: str | Path, group: str = GROUP) -> xr.Dataset:
    """Head scores saved in a store by :func:`score`."""
    if group not in list_groups(store):
        raise HeadsError(f"store {store} has no {group!r} group; run heads.score(loaded, store=...) "
                         "or `icl-geometry heads score STORE` first")
    dataset = xr.open_zarr(str(store), group=group, consolidated=False).load()
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
    batch_size: int = 8,
    overwrite: bool = False,
    progress: bool = True,
    **prompt_options: Any,
) -> xr.Dataset:
    """Score every head: ``pth``, ``ih`` and the detectors, as a Dataset over (layer, head) (see module docstring).

    With ``store`` the result is saved as group ``head_scores`` and re-used when a later call has the same
    configuration (model, task, shots, n, seed, detector settings); a different configuration is refused unless
    ``overwrite``. ``prompt_options`` are the prompt settings of ``extraction.extract`` (template, separator, ...).
    """
    if n_random < 1 or repeat < 2:
        raise HeadsError(f"n_random must be >= 1 and repeat >= 2 (got {n_random}, {repeat})")
    config = _score_config(loaded, task, shots, n, seed, n_random, repeat, prompt_options)
    if store is not None and Path(store).exists() and GROUP in list_groups(store) and not overwrite:
        saved = load_scores(store)
        if same_record(saved.attrs.get("config"), config):
            log.info("re-using head scores from %s", store)
            return saved
        raise ScoresClashError(f"store {store} holds head scores computed with another configuration "
                               f"({saved.attrs.get('config')})", path=store, group=GROUP,
                               remedy="pass overwrite=True to replace them")
    pth, ih, zero_config, few_config = _prompt_scores(loaded, prompt_options, shots, n, seed, batch_size, task, progress)
    detectors = _detector_scores(loaded, n_random, repeat, seed, batch_size)
    arch = loaded.arch
    values = {"pth": pth, "ih": ih, **detectors}
    dataset = xr.Dataset(
        {name: (("layer", "head"), values[name].astype(np.float32), {"definition": DEFINITIONS[name]})
         for name in SCORES},
        coords={"layer": np.arange(arch.n_layers), "head": np.arange(arch.n_heads)},
        attrs={"config": config, "zero_shot_prompts": zero_config, "icl_prompts": few_config,
               "layer_convention": "layer l = block l (0-based); head h = query head h of its attention"},
    )
    if store is not None:
        dataset.to_zarr(str(store), group=GROUP, mode="w", consolidated=False)
        consolidate(store)
        log.info("head scores saved to %s (group %s)", store, GROUP)
    return dataset
