"""The extraction loop: prompts -> batched forward with query-only hooks -> one group of the Zarr store.

Batches are formed from prompts of similar length (less padding) within each chunk of the store along
``example``, each batch is moved to the CPU and written at once, so memory stays flat as the number of prompts
grows. A run interrupted at any point and started again with the same configuration writes only the examples
that are missing. With a Dask client the chunks are shards run by the cluster's workers
(:mod:`extraction.distributed`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import xarray as xr
from tqdm.auto import tqdm

from extraction.architecture import final_norm_form
from extraction.capture import LAYER_CONVENTION, run_with_capture
from extraction.distributed import ModelRecipe, check_chunking, check_cluster, connected, run_on_cluster, shards
from extraction.errors import ClusterError, StoreError
from extraction.interventions import (Batch, Intervention, as_interventions, intervening, refuse_active,
                                      stored_arrays)
from extraction.lens import logit_lens
from extraction.models import LoadedModel
from extraction.positions import KIND_CODES
from extraction.prompts import (Encoded, Prompt, PromptConfig, PromptSet, Tokens, build_prompts, check_lengths,
                                encode, label_token_ids, tokenize)
from extraction.statistics_writer import KEEP, StatisticsWriter
from extraction.store import (EXAMPLE_CHUNK, GroupWriter, consolidate, library_versions, open_group,
                              stored_example_chunk)
from extraction.tasks import Task, load_task

log = logging.getLogger(__name__)

STORE_DTYPES = ("float32", "float16")
LENS_CONVENTION = ("logit lens: final norm applied to each layer's state, then the LM head, then the output scaling "
                   "and soft-capping the config declares (as for the model's output)")
LIBRARIES = ("icl-geometry", "torch", "transformers", "numpy", "xarray", "zarr")


def default_setting(shots: int) -> str:
    return "zero_shot" if shots == 0 else "icl"


def _layout(n: int, shots: int, arch, classes: int, store_dtype: str, tokens: int) -> dict[str, tuple]:
    layers = arch.n_states
    return {
        "hidden": (("example", "layer", "dim"), (n, layers, arch.hidden_size), store_dtype),
        "label": (("example",), (n,), "int32"),
        "query_index": (("example",), (n,), "int32"),
        "pred_token": (("example",), (n,), "int64"),
        "correct": (("example",), (n,), "bool"),
        "label_logits": (("example", "class"), (n, classes), "float32"),
        "lens_label_logits": (("example", "layer", "class"), (n, layers, classes), "float32"),
        "lens_top_token": (("example", "layer"), (n, layers), "int64"),
        "demo_indices": (("example", "shot"), (n, shots), "int32"),
        "prompt": (("example",), (n,), str),
        "n_tokens": (("example",), (n,), "int32"),
        "position_kind": (("example", "token"), (n, tokens), "int8"),
        "position_demo": (("example", "token"), (n, tokens), "int16"),
        "done": (("example",), (n,), "bool"),
    }


def _static(loaded: LoadedModel, words: tuple[str, ...], tokens: list[int]) -> tuple[dict, dict]:
    arch = loaded.arch
    rows = arch.unembedding.weight[tokens].detach().float().cpu()
    head_bias = arch.unembedding.bias
    head_bias = torch.zeros(len(tokens)) if head_bias is None else head_bias[tokens].detach().float().cpu()
    form = final_norm_form(arch)
    static = {
        "class": (("class",), np.array(words)),
        "layer": (("layer",), np.arange(arch.n_states)),
        "label_token": (("class",), np.array(tokens, dtype=np.int64)),
        "unembed": (("class", "dim"), rows.numpy()),
        "lens_unembed": (("class", "dim"), (rows * form.gain).numpy()),
        "lens_bias": (("class",), (rows @ form.bias + head_bias).numpy()),
    }
    attrs = {"lens_center": form.center, "lens_form_exact": form.exact,
             "lens_logit_scale": arch.readout.scale, "lens_softcap": arch.readout.softcap}
    return static, attrs


def extract(
    loaded: LoadedModel,
    out: str | Path,
    *,
    task: str | Task = "sentiment",
    shots: int = 8,
    n: int = 64,
    seed: int = 0,
    setting: str | None = None,
    batch_size: int = 8,
    template: str | None = None,
    separator: str = "\n",
    sampling: str = "uniform",
    label_mode: str = "words",
    label_words: tuple[str, ...] | None = None,
    allow_multitoken_labels: bool = False,
    store_dtype: str = "float32",
    intervention: Intervention | Sequence[Intervention] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    keep: str = "states",
    statistics_blocks: int = 16,
    statistics_rank: int | None = None,
    example_chunk: int | None = None,
    client: Any = None,
    workers: int | None = None,
) -> xr.Dataset:
    """Extract query states of ``n`` prompts into group ``setting`` of the store at ``out``; return the group.

    ``setting`` defaults to ``icl`` (shots > 0) or ``zero_shot``. ``intervention`` is an intervention object (e.g.
    ``heads.HeadAblation(heads)``, ``heads.Injection(vector, layer)``, ``extraction.EdgeKnockout(edge, blocks)``)
    or a list of them, applied in order around every forward pass of the run and recorded exactly with the group
    (see :mod:`extraction.interventions`).
    Re-running with the same arguments resumes an interrupted run; different arguments (a different intervention
    included, or a model loaded with another dtype or quantisation: see :attr:`LoadedModel.identity`) into an
    existing group are refused unless ``overwrite``.

    ``keep="statistics"`` keeps, per layer and class (in ``statistics_blocks`` blocks, the bootstrap's units), the
    running count, mean and centred second moment of the query states instead of the states: fixed memory and
    store size for any number of prompts; measure the group with ``geometry.measure(..., engine="statistics")``
    (see :mod:`extraction.statistics_writer`). ``statistics_rank`` r keeps a rank-r sketch of each second moment
    instead of the full d x d one (exact while a unit's moment has rank <= r; see :mod:`geometry.sketch`).

    ``example_chunk`` is the store's chunk along ``example`` (default 512, capped at ``n``; a resumed group keeps
    its own): batches never span two chunks. ``client`` (a ``dask.distributed.Client`` or a scheduler address
    ``tcp://host:port``) or ``workers`` (a local cluster of that many single-threaded worker processes) shards the
    run over Dask workers, one chunk a task, each worker loading the model once and writing its chunks itself; the
    store is the one a single process writes with the same ``example_chunk``, bit for bit
    (see :mod:`extraction.distributed`).
    """
    interventions = as_interventions(intervention)
    refuse_active(loaded.arch)
    for item in interventions:
        item.check(loaded.arch)
    if store_dtype not in STORE_DTYPES:
        raise StoreError(f"store_dtype must be one of {', '.join(STORE_DTYPES)}, not {store_dtype!r}")
    if batch_size < 1:
        raise StoreError(f"batch_size must be >= 1, not {batch_size}")
    task_obj = task if isinstance(task, Task) else load_task(task, template=template)
    prompt_config = PromptConfig(shots=shots, n=n, seed=seed, template=template, separator=separator,
                                 sampling=sampling, label_mode=label_mode, label_words=label_words,
                                 allow_multitoken_labels=allow_multitoken_labels)
    prompts = build_prompts(task_obj, prompt_config)
    for item in interventions:
        item.prepare(loaded, task_obj, prompts)
    records = [item.describe() for item in interventions] or None
    tokenized = tokenize(loaded.tokenizer, prompts.prompts)  # once: the label check, lengths and batches reuse it
    tokens = label_token_ids(loaded.tokenizer, prompts, tokenized)
    longest = check_context(loaded, prompts, tokenized)
    setting = setting or default_setting(shots)
    config = {
        **prompt_config.to_dict(), "task": task_obj.name, "template": prompts.template, **loaded.identity,
        "store_dtype": store_dtype, "intervention": records,
    }
    if keep != "states" and (client is not None or workers is not None):
        raise ClusterError("keep='statistics' runs in one process; drop client and workers (or keep='states')")
    stored_chunk = None if overwrite else stored_example_chunk(out, setting)
    chunk = _example_chunk(n, example_chunk, stored_chunk, f"group {setting!r} of {out}")
    with connected(client, workers) as cluster:
        recipe = ModelRecipe.of(loaded) if cluster is not None else None
        if cluster is not None:
            n_workers = check_cluster(cluster, out, recipe)
            if stored_chunk is None:
                check_chunking(n, chunk, n_workers)
        writer = _writer(out, setting, config, overwrite, keep, statistics_blocks, statistics_rank, prompts,
                         len(tokens))
        if not writer.exists:
            static, lens_attrs = _static(loaded, prompts.label_words, tokens)
            writer.create(
                _layout(n, shots, loaded.arch, len(tokens), store_dtype, longest),
                {**static, **stored_arrays(interventions)},
                {
                    "task": task_obj.name, "shots": shots, "n_layers": loaded.arch.n_layers, "setting": setting,
                    "layer_convention": LAYER_CONVENTION, "lens_convention": LENS_CONVENTION,
                    "intervention": records, "position_kinds": KIND_CODES,
                    "provenance": {**loaded.provenance, "libraries": library_versions(LIBRARIES)},
                    **lens_attrs,
                },
                example_chunk=chunk,
            )
        _fill(loaded, writer, list(zip(prompts.prompts, tokenized)), tokens, interventions, batch_size, store_dtype,
              progress, cluster, recipe)
    return open_group(out, setting)


def _example_chunk(n: int, example_chunk: int | None, stored: int | None, group: str) -> int:
    """The group's chunk along ``example``: the ``stored`` one when resuming (a different request is refused),
    else ``example_chunk`` (default :data:`EXAMPLE_CHUNK`) capped at ``n``."""
    if example_chunk is not None and (isinstance(example_chunk, bool) or not isinstance(example_chunk, int)
                                      or example_chunk < 1):
        raise StoreError(f"example_chunk must be an integer >= 1, not {example_chunk!r}")
    wanted = min(example_chunk or EXAMPLE_CHUNK, n)
    if stored is not None and example_chunk is not None and wanted != stored:
        raise StoreError(f"{group} is chunked {stored} examples along example, not {wanted}; pass "
                         f"example_chunk={stored} to resume it, or overwrite=True to replace it")
    return stored or wanted


def _writer(out: str | Path, setting: str, config: dict, overwrite: bool, keep: str, blocks: int,
            rank: int | None, prompts: PromptSet, n_classes: int) -> GroupWriter:
    """The group's writer: every state stored, or (``keep="statistics"``) only their running statistics."""
    if keep not in KEEP:
        raise StoreError(f"keep must be one of {', '.join(KEEP)}, not {keep!r}")
    if keep == "states":
        return GroupWriter(out, setting, config, overwrite=overwrite)
    if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1:
        raise StoreError(f"statistics_blocks must be an integer >= 1, not {blocks!r}")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise StoreError(f"statistics_rank must be an integer >= 1 or None (full moments), not {rank!r}")
    labels = np.array([p.label for p in prompts.prompts])
    settings = {"keep": keep, "statistics_blocks": blocks, **({} if rank is None else {"statistics_rank": rank})}
    return StatisticsWriter(out, setting, {**config, **settings}, labels=labels, n_classes=n_classes,
                            n_blocks=blocks, rank=rank, overwrite=overwrite)


def check_context(loaded: LoadedModel, prompts: PromptSet, tokenized: Sequence[Tokens]) -> int:
    """Refuse a prompt longer than the model's context before anything is written (the batches check it again);
    return the longest prompt's length in tokens (``tokenized``: the prompts' tokens)."""
    lengths = np.array([len(t.ids) for t in tokenized])
    check_lengths(lengths, prompts.prompts, loaded.arch.max_context)
    return int(lengths.max())


def batches_by_length(tokens: Sequence[Tokens], batch_size: int) -> list[np.ndarray]:
    """Positions in ``tokens`` (prompts' :func:`~extraction.prompts.tokenize`) grouped into batches of similar
    token length (sorted within each batch)."""
    order = np.argsort([len(t.ids) for t in tokens], kind="stable")
    return [np.sort(order[i:i + batch_size]) for i in range(0, len(order), batch_size)]


def _fill(loaded, writer: GroupWriter, items: list[tuple[Prompt, Tokens]], tokens: list[int],
          interventions: list[Intervention], batch_size: int, store_dtype: str, progress: bool, cluster: Any,
          recipe: ModelRecipe | None) -> None:
    """Extract the pending examples (``items``: every example's prompt and its tokens) chunk by chunk, here or
    (``cluster``) one chunk a Dask task."""
    pending = writer.pending()
    if len(pending) == 0:
        return
    if len(pending) < len(items):
        log.info("resuming %s: %d of %d examples left", writer.group, len(pending), len(items))
    bar = tqdm(total=len(items), initial=len(items) - len(pending), unit="prompt", desc=f"extract {writer.group}",
               disable=not progress)
    options = dict(tokens=tokens, interventions=interventions, batch_size=batch_size, store_dtype=store_dtype)
    if cluster is None:
        for index in shards(pending, writer.example_chunk):
            fill_shard(loaded, writer, index, [items[i] for i in index], bar=bar, **options)
    else:
        run_on_cluster(cluster, recipe, writer, items, writer.example_chunk, fill_shard, options, bar)
        consolidate(writer.path)
    bar.close()


def fill_shard(loaded: LoadedModel, writer: GroupWriter, index: np.ndarray, items: Sequence[tuple[Prompt, Tokens]],
               *, tokens: list[int], interventions: list[Intervention], batch_size: int, store_dtype: str,
               bar: Any = None) -> None:
    """Extract ``items`` (the prompts of examples ``index``, all in one chunk, with their tokens) batch by batch
    into ``writer``."""
    label_tokens = np.array(tokens)
    for item in interventions:
        item.bind(loaded)
    for pick in batches_by_length([t for _, t in items], batch_size):
        batch = [items[j][0] for j in pick]
        encoded = encode(loaded.tokenizer, batch, max_length=loaded.arch.max_context,
                         tokens=[items[j][1] for j in pick])
        with intervening(interventions, loaded.arch,
                         Batch(encoded.input_ids, encoded.attention_mask, encoded.groups, tuple(batch))):
            states, logits = run_with_capture(loaded, encoded.input_ids, encoded.attention_mask)
        lens = logit_lens(loaded, states, tokens)
        labels = np.array([p.label for p in batch])
        predicted = logits.argmax(dim=-1).numpy()
        writer.write(index[pick], {
            "hidden": states.numpy().astype(store_dtype),
            "label": labels,
            "query_index": np.array([p.query_index for p in batch]),
            "pred_token": predicted,
            "correct": predicted == label_tokens[labels],
            "label_logits": logits[:, tokens].numpy(),
            "lens_label_logits": lens.label_logits,
            "lens_top_token": lens.top_token,
            "demo_indices": np.array([p.demo_indices for p in batch], dtype=np.int32).reshape(len(batch), -1),
            "prompt": np.array([p.text for p in batch], dtype=object),
            "n_tokens": encoded.attention_mask.sum(dim=1).numpy(),
            **_stored_groups(encoded, writer.node),
        })
        if bar is not None:
            bar.update(len(pick))


def _stored_groups(encoded: Encoded, node) -> dict[str, np.ndarray]:
    """The batch's position groups left-aligned (first real token at index 0), padded with -1 to the stored width
    (none for a group an older version began, which has no position arrays)."""
    if "position_kind" not in node:
        return {}
    width, out = node["position_kind"].shape[1], {}
    for name, values in (("position_kind", encoded.groups.kind), ("position_demo", encoded.groups.demo)):
        stored = np.full((len(values), width), -1, values.numpy().dtype)
        for row, keep in enumerate(encoded.attention_mask.bool()):
            real = values[row][keep].numpy()
            stored[row, :len(real)] = real
        out[name] = stored
    return out


def accuracy(dataset: xr.Dataset) -> dict[str, float]:
    """Whole-vocabulary accuracy (the paper's) and label-restricted accuracy of a store group."""
    label_pred = dataset["label_logits"].argmax("class")
    return {
        "accuracy": float(dataset["correct"].mean()),
        "label_accuracy": float((label_pred == dataset["label"]).mean()),
    }
