"""Extraction throughput, memory and load time against the practical limit and the common way, in one run.

Measured on the same length-sorted batches of the same prompts (8-shot ``sentiment`` by default):

* ``extract``: the toolkit's full loop (hooks keeping only the query position, last-position logits, logit lens
  on the query only, writes to a Zarr store);
* bare: one forward computing only last-position logits and nothing else (the practical limit);
* common: ``output_hidden_states=True`` with logits at every position, query rows picked afterwards.

Peak memory is the peak resident set size of a child process that loads the model and runs ``extract`` on N and
on 4N prompts (streaming writes should keep it flat; N is ``--n`` capped at a quarter of the query pool, 32 for
``sentiment``). Load time is the default model's load from the GGUF into an
empty cache (first) and from the converted cache (cached). The last line printed is one JSON object.

    python benchmarks/extraction.py            # full run (~6 min on a 2-core CPU)
    python benchmarks/extraction.py --quick    # smaller, skips the first (conversion) load
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# This script's folder shadows the ``extraction`` package when run as ``python benchmarks/extraction.py``.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

from extraction.capture import position_ids, query_positions
from extraction.extractor import batches_by_length, extract
from extraction.models import load_model
from extraction.prompts import PromptConfig, build_prompts, encode, tokenize
from extraction.tasks import load_task


def timed_load(cache: str | None) -> float:
    """Seconds of ``load_model()`` in a fresh process, imports excluded (``cache``: ICL_GEOMETRY_CACHE or default)."""
    env = dict(os.environ)
    if cache is not None:
        env["ICL_GEOMETRY_CACHE"] = cache
    code = "from extraction.models import load_model; import time; t = time.perf_counter(); load_model(); " \
           "print(time.perf_counter() - t)"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return float(result.stdout.strip().splitlines()[-1])


def peak_memory_mib(n: int, args: argparse.Namespace) -> float:
    """Peak RSS (MiB) of a child process that loads the model and extracts ``n`` prompts."""
    with tempfile.TemporaryDirectory() as folder:
        command = [sys.executable, __file__, "--child-extract", str(n), "--store", f"{folder}/m.zarr",
                   "--dtype", args.dtype, "--batch-size", str(args.batch_size), "--shots", str(args.shots)]
        result = subprocess.run(command, capture_output=True, text=True, check=True)
    return float(result.stdout.strip().splitlines()[-1])


def child_extract(args: argparse.Namespace) -> None:
    loaded = load_model(dtype=args.dtype)
    extract(loaded, args.store, task="sentiment", shots=args.shots, n=args.child_extract,
            batch_size=args.batch_size, progress=False)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


@torch.no_grad()
def bare(model, input_ids, attention_mask) -> None:
    model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
          logits_to_keep=1, use_cache=False)


@torch.no_grad()
def common(model, input_ids, attention_mask) -> None:
    output = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
                   output_hidden_states=True, use_cache=False)
    rows, query = torch.arange(len(input_ids)), query_positions(attention_mask)
    torch.stack([state[rows, query] for state in output.hidden_states], dim=1)
    output.logits[rows, query]


def throughput(args: argparse.Namespace) -> dict:
    loaded = load_model(dtype=args.dtype)
    prompts = build_prompts(load_task("sentiment"), PromptConfig(shots=args.shots, n=args.n, seed=0))
    tokenized = tokenize(loaded.tokenizer, prompts.prompts)
    batches = [encode(loaded.tokenizer, [prompts.prompts[i] for i in index], tokens=[tokenized[i] for i in index])
               for index in batches_by_length(tokenized, args.batch_size)]
    tokens = sum(int(b.attention_mask.sum()) for b in batches)
    bare(loaded.model, batches[0].input_ids, batches[0].attention_mask)  # warm-up
    seconds = {}
    for name, run in (("bare", bare), ("common", common)):
        start = time.perf_counter()
        for batch in batches:
            run(loaded.model, batch.input_ids, batch.attention_mask)
        seconds[name] = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as folder:
        extract(loaded, Path(folder) / "warm.zarr", task="sentiment", shots=args.shots, n=args.batch_size,
                batch_size=args.batch_size, progress=False)  # warm-up, like the baselines'
        start = time.perf_counter()
        extract(loaded, Path(folder) / "t.zarr", task="sentiment", shots=args.shots, n=args.n,
                batch_size=args.batch_size, progress=False)
        seconds["extract"] = time.perf_counter() - start
    rates = {name: {"prompts_per_s": args.n / s, "tokens_per_s": tokens / s, "seconds": s}
             for name, s in seconds.items()}
    return {"prompts": args.n, "tokens": tokens, "rates": rates,
            "vs_bare": seconds["bare"] / seconds["extract"], "vs_common": seconds["common"] / seconds["extract"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=64, help="prompts for throughput and N for memory (default 64)")
    parser.add_argument("--shots", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--quick", action="store_true", help="n=16 and no first (conversion) load")
    parser.add_argument("--child-extract", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_extract:
        return child_extract(args)
    if args.quick:
        args.n = 16
    result = {"device": "cpu", "dtype": args.dtype, "shots": args.shots, "batch_size": args.batch_size}
    result.update(throughput(args))
    print(json.dumps(result["rates"]), flush=True)
    n = min(args.n, len(load_task("sentiment").test) // 4)  # 4N prompts must fit the query pool
    memory_n, memory_4n = peak_memory_mib(n, args), peak_memory_mib(4 * n, args)
    result.update(peak_rss_mib={"n": memory_n, "4n": memory_4n, "N": n}, memory_4n_over_n=memory_4n / memory_n)
    if not args.quick:
        with tempfile.TemporaryDirectory() as cache:
            result["first_load_s"] = timed_load(cache)
    result["cached_load_s"] = timed_load(None)
    result["targets"] = {"vs_bare": ">= 0.9", "vs_common": ">= 2", "memory_4n_over_n": "<= 1.1", "cached_load_s": "<= 10"}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
