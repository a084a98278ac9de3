"""``icl-geometry extract``: query hidden states of a model on an ICL task into a Zarr store."""

from __future__ import annotations

import argparse
import codecs
import json
from contextlib import contextmanager
from typing import Iterator

from extraction.tasks import list_tasks

EXAMPLES = """
examples:
  # 8-shot and zero-shot states of the default model (Gemma 3 270M) on the built-in sentiment task
  icl-geometry extract --task sentiment --shots 8 --n 128 --out results/store.zarr
  icl-geometry extract --task sentiment --shots 0 --n 128 --out results/store.zarr

  # your own data: a CSV/JSONL/Parquet file with 'text' and 'label' columns (optional 'split': train/test)
  icl-geometry extract --data reviews.csv --template "{text} Verdict: {label}" --out store.zarr

  # any Hugging Face causal LM: a local folder, a .gguf file, or a hub id already in the local cache
  icl-geometry extract --model ./my-llama --dtype bfloat16 --task topic --out store.zarr

  # a model too big for one GPU: spread over the GPUs (at most 20 GiB each), the rest in CPU memory
  icl-geometry extract --model ./llama-2-13b --dtype bfloat16 --device-map auto \
      --max-memory 0=20GiB,1=20GiB,cpu=60GiB --out store.zarr

  # sharded over Dask: 4 local single-threaded worker processes, or the workers of a running scheduler
  icl-geometry extract --n 4096 --workers 4 --out store.zarr
  icl-geometry extract --n 100000 --scheduler tcp://head-node:8786 --example-chunk 256 --out /shared/store.zarr

Each run writes one group (--setting, default 'icl' or 'zero_shot') holding per example the query state at every
layer (layer 0 = embedding output, layer l = output of block l-1, all before the final norm), the gold label, the
model's prediction, label-word logits and the logit lens. Open it with xarray.open_zarr(STORE, group=SETTING).
An interrupted run resumes when re-run with the same arguments.
"""


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Model options shared by every command that runs a model."""
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=None, metavar="SPEC",
                       help="hub id, local Hugging Face folder or .gguf file (default: the bundled Gemma 3 270M)")
    group.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                       help="weights dtype; bfloat16 is 2-3x faster on recent CPUs (default: float32)")
    group.add_argument("--device", default=None, help="torch device, e.g. cuda or cpu (default: where it loads)")
    group.add_argument("--device-map", default=None, metavar="MAP",
                       help="spread a big model: auto, balanced, sequential, one device, or a JSON object of "
                            "module -> device (GPU index, cuda:i, cpu, disk)")
    group.add_argument("--max-memory", default=None, metavar="SIZES",
                       help="cap per device for --device-map, e.g. 0=20GiB,1=20GiB,cpu=60GiB")
    group.add_argument("--quantization", default=None, metavar="KIND",
                       help="quantised weights: bnb-4bit, bnb-nf4, bnb-8bit, or a JSON object with quant_method "
                            "and its options (needs that backend, e.g. bitsandbytes)")
    group.add_argument("--attn-implementation", default=None, metavar="NAME",
                       help="attention kernel: eager, sdpa, flash_attention_2, ... (default: transformers' choice)")


def add_prompt_arguments(parser: argparse.ArgumentParser) -> None:
    """Task and prompt options shared by every command that builds ICL prompts."""
    group = parser.add_argument_group("task and prompts")
    source = group.add_mutually_exclusive_group()
    source.add_argument("--task", default="sentiment", help=f"built-in task: {', '.join(list_tasks())}")
    source.add_argument("--data", metavar="FILE", help="your own .csv/.jsonl/.parquet with text and label columns")
    group.add_argument("--template", default=None, help="prompt template with {text} and {label}, label last")
    group.add_argument("--separator", default="\n", help="text between demonstrations; escapes like \\n work (default: newline)")
    group.add_argument("--shots", type=int, default=8, help="demonstrations per prompt, k (default: 8)")
    group.add_argument("--n", type=int, default=64, help="number of queries (default: 64)")
    group.add_argument("--seed", type=int, default=0, help="seed of demonstration and query sampling (default: 0)")
    group.add_argument("--sampling", default="uniform", choices=["uniform", "balanced"],
                       help="demonstrations drawn uniformly or class-balanced (default: uniform)")
    group.add_argument("--label-mode", default="words", choices=["words", "symbolic", "random"],
                       help="label words, symbols (@, #, ...) or random demonstration labels (control)")
    group.add_argument("--label-words", default=None, help="comma-separated label words, one per class")
    group.add_argument("--allow-multitoken-labels", action="store_true",
                       help="score a multi-token label word by its first token instead of refusing it")


def model_kwargs(args: argparse.Namespace) -> dict:
    """Keyword arguments of ``extraction.load_model`` (after the spec) from parsed model options."""
    from extraction.placement import parse_device_map, parse_max_memory

    return dict(dtype=args.dtype, device=args.device, device_map=parse_device_map(args.device_map),
                max_memory=parse_max_memory(args.max_memory), quantization_config=args.quantization,
                attn_implementation=args.attn_implementation)


def prompt_kwargs(args: argparse.Namespace) -> dict:
    """Keyword arguments of ``extraction.extract`` from parsed prompt options."""
    return dict(
        task=args.data or args.task, shots=args.shots, n=args.n, seed=args.seed, template=args.template,
        separator=codecs.decode(args.separator, "unicode_escape"), sampling=args.sampling, label_mode=args.label_mode,
        label_words=tuple(w.strip() for w in args.label_words.split(",")) if args.label_words else None,
        allow_multitoken_labels=args.allow_multitoken_labels,
    )


def add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    """Options that shard a command's extraction runs over a Dask cluster (see extraction.distributed)."""
    group = parser.add_argument_group("scaling out (needs pip install 'icl-geometry[dask]')")
    where = group.add_mutually_exclusive_group()
    where.add_argument("--scheduler", default=None, metavar="ADDRESS",
                       help="shard over the workers of a running Dask scheduler, e.g. tcp://host:8786")
    where.add_argument("--workers", type=int, default=None, metavar="N",
                       help="shard over a local cluster of N single-threaded worker processes")
    group.add_argument("--example-chunk", type=int, default=None, metavar="K",
                       help="examples per store chunk along example, one shard each (default: 512, at most --n)")


@contextmanager
def cluster_options(args: argparse.Namespace) -> Iterator[dict]:
    """``extraction.extract``'s cluster keyword arguments from parsed cluster options: one Dask client (or None)
    for every extraction of the command, closed when it ends."""
    from extraction.distributed import connected

    with connected(args.scheduler, args.workers) as client:
        yield dict(client=client, example_chunk=args.example_chunk)


def run_extract(args: argparse.Namespace) -> int:
    from extraction.extractor import accuracy, extract
    from extraction.models import load_model

    loaded = load_model(args.model, **model_kwargs(args))
    with cluster_options(args) as cluster:
        dataset = extract(loaded, args.out, setting=args.setting, batch_size=args.batch_size,
                          store_dtype=args.store_dtype, overwrite=args.overwrite, keep=args.keep,
                          statistics_blocks=args.statistics_blocks, statistics_rank=args.statistics_rank,
                          **cluster, **prompt_kwargs(args))
    print(json.dumps({"store": str(args.out), "group": dataset.attrs["setting"], **accuracy(dataset)}))
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "extract", help="extract per-layer query hidden states into a Zarr store",
        description="Run a causal LM over ICL prompts and store the query position's hidden state at every layer.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(parser)
    add_prompt_arguments(parser)
    group = parser.add_argument_group("store")
    group.add_argument("--out", required=True, metavar="STORE", help="Zarr store path (created if missing)")
    group.add_argument("--setting", default=None, help="group name in the store (default: icl or zero_shot)")
    group.add_argument("--batch-size", type=int, default=8, help="prompts per forward pass (default: 8)")
    group.add_argument("--store-dtype", default="float32", choices=["float32", "float16"],
                       help="dtype of stored hidden states (default: float32)")
    group.add_argument("--overwrite", action="store_true", help="replace a group written with other settings")
    add_cluster_arguments(parser)
    group.add_argument("--keep", default="states", choices=["states", "statistics"],
                       help="states: every query state; statistics: per layer and class only their running count, "
                            "mean and second moment (fixed size for any --n; default: states)")
    group.add_argument("--statistics-blocks", type=int, default=16, metavar="G",
                       help="with --keep statistics: blocks per class, the bootstrap's units (default: 16)")
    group.add_argument("--statistics-rank", type=int, default=None, metavar="R",
                       help="with --keep statistics: keep a rank-R sketch of each second moment instead of the full "
                            "d x d one (default: full)")
    parser.set_defaults(func=run_extract)
