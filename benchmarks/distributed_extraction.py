"""Sharded extraction on Dask against one process: throughput, and peak memory of the client and of a worker.

On the same prompts (8-shot ``sentiment``, one ``example_chunk`` for both, so both write the same store):

* ``single``: ``extract`` in this process with 2 torch threads;
* ``cluster``: ``extract(..., client=...)`` on a warm ``LocalCluster`` of 2 single-threaded worker processes
  (started and its workers' model loaded before the rounds; the cold start is reported on its own).

Rounds interleave the two (the order alternating) and the medians are reported, with their ratio (cluster
throughput / single throughput; the target is >= 0.9 on a 2-core CPU). Peak memory: child processes each run one
sharded extraction of N and of 4N prompts on a fresh 2-worker cluster and report the peak resident set size of
the client process and of the larger worker (flat in the number of prompts: the client never gathers states,
each worker keeps one batch). The model is a random Llama (hidden 256, 4 blocks) saved to a temporary folder, which
the workers load from disk; the load average before and after is recorded. The last line printed is one JSON object.

    python benchmarks/distributed_extraction.py            # ~3-5 min on a 2-core CPU
    python benchmarks/distributed_extraction.py --quick    # fewer prompts and rounds
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Run as a script, this folder would shadow the ``extraction`` package; the checkout it belongs to is measured
# (and holds the tiny models' tokenizer builder, tests/conftest.py).
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402
from distributed import Client, LocalCluster  # noqa: E402

from extraction.extractor import extract  # noqa: E402
from extraction.models import load_model  # noqa: E402
from tests.conftest import build_word_tokenizer  # noqa: E402

WORKERS = 2
RUN = dict(task="sentiment", shots=8, batch_size=8, progress=False)


def build_model(folder: Path, hidden: int, blocks: int) -> Path:
    """A random Llama with the tests' word tokenizer, saved in ``folder``."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    tokenizer = build_word_tokenizer(folder)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=blocks, num_attention_heads=8, num_key_value_heads=4,
                         max_position_embeddings=2048, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def local_cluster() -> tuple[LocalCluster, Client]:
    cluster = LocalCluster(n_workers=WORKERS, threads_per_worker=1, processes=True, dashboard_address=None)
    return cluster, Client(cluster)


def peak_mib() -> float:
    """This process's peak resident set size in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_peak(model: str, n: int, chunk: int) -> None:
    """(In a child process) one sharded extraction of ``n`` prompts; print the client's and a worker's peak RSS."""
    loaded = load_model(model)
    cluster, client = local_cluster()
    with tempfile.TemporaryDirectory() as folder:
        extract(loaded, Path(folder) / "m.zarr", n=n, example_chunk=chunk, client=client, **RUN)
    workers = client.run(peak_mib)
    print(json.dumps({"client_mib": round(peak_mib(), 1), "worker_mib": round(max(workers.values()), 1)}))
    client.close()
    cluster.close()


def peak(model: Path, n: int, chunk: int) -> dict:
    command = [sys.executable, __file__, "--child", str(model), "--n", str(n), "--chunk", str(chunk)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def timed(run) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=128, help="prompts per timed extraction (default 128)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--memory-n", type=int, default=64, help="N of the peak-memory runs (N and 4N; default 64)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="n 64, 2 rounds, memory at 32 and 128 prompts")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--chunk", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child_peak(args.child, args.n, args.chunk)
    if args.quick:
        args.n, args.rounds, args.memory_n = 64, 2, 32
    chunk = args.n // (2 * WORKERS)  # two shards a worker
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        model = build_model(folder / "model", args.hidden, args.blocks)
        torch.set_num_threads(2)
        loaded = load_model(str(model))
        started = time.perf_counter()
        cluster, client = local_cluster()
        extract(loaded, folder / "warm.zarr", n=args.n, example_chunk=chunk, client=client, **RUN)
        cold = time.perf_counter() - started
        seconds: dict[str, list[float]] = {"single": [], "cluster": []}
        for round_ in range(args.rounds):
            order = ("single", "cluster") if round_ % 2 == 0 else ("cluster", "single")
            for name in order:
                store = folder / f"{name}{round_}.zarr"
                on = {"client": client} if name == "cluster" else {}
                seconds[name].append(timed(lambda: extract(loaded, store, n=args.n, example_chunk=chunk, **on, **RUN)))
        client.close()
        cluster.close()
        memory = {n: peak(model, n, max(1, n // (2 * WORKERS))) for n in (args.memory_n, 4 * args.memory_n)}
    median = {name: statistics.median(values) for name, values in seconds.items()}
    rate = {name: args.n / value for name, value in median.items()}
    print(json.dumps({
        "model": f"random Llama, hidden {args.hidden}, {args.blocks} blocks, float32",
        "prompts": args.n, "task": "sentiment, 8 shots", "batch_size": RUN["batch_size"], "example_chunk": chunk,
        "rounds": args.rounds, "workers": WORKERS,
        "single_2_threads_prompts_per_s": round(rate["single"], 2),
        "cluster_2_workers_prompts_per_s": round(rate["cluster"], 2),
        "ratio_cluster_over_single": round(rate["cluster"] / rate["single"], 3),
        "seconds": {name: [round(v, 2) for v in values] for name, values in seconds.items()},
        "cluster_cold_start_and_first_run_s": round(cold, 1),
        "peak_rss_mib": {str(n): value for n, value in memory.items()},
        "load_average_before_after": [round(v, 2) for v in (*load_before[:1], os.getloadavg()[0])],
        "cpus": os.cpu_count(),
    }))


if __name__ == "__main__":
    main()
