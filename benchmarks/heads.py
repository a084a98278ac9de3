"""Single-head ablation sweep: the fast method against the naive one-forward-per-head loop, in one run.

Both zero-ablate each head of the default model alone on the same length-sorted batches of ``--n`` 8-shot
``sentiment`` prompts and read the label words' logits at the query (``heads.sweep``):

* fast: one clean pass per batch records every block's input; for each layer l, only blocks l..L-1 are re-run,
  one stacked copy per head of l, and only the label logits are computed;
* naive: one full forward pass per head under ``heads.ablate`` (last-position logits only, ``logits_to_keep=1``),
  plus one clean pass: L*H + 1 passes.

The fast sweep covers all heads. The naive loop costs the same for every head, so by default it runs on a subset
(``--naive-heads``, one head from each quarter of the depth) and its time is extrapolated to all heads as
``time(subset) * (L*H + 1) / (len(subset) + 1)``; equality is checked on that subset (``--naive-heads all`` runs the
whole loop, ~20 min). ``work_ratio`` is the block-evaluation count of the naive loop over the fast method's
(``(L*H + 1) * L / (L + H * L * (L + 1) / 2)``): the speed-up that skipping the layers below each head can give.
``common_loop_s_per_head`` times one head of the loop people often write instead, ``model(**batch).logits[:, -1]``,
which computes the whole vocabulary's logits at every position.

Wall times on a shared CPU are noisy: the naive subset is timed before and after the fast sweep and the two are
averaged, CPU times of this process (``process_time``) are reported beside wall times, and so is the load average.

``memory`` (tiny random Llama models, 8 heads, built in a temporary folder): the peak memory of ``heads.score`` on
one batch of 8 prompts, at 1x, 2x and 4x the prompt length (8, 16 and 32 shots, detector repeat 25, 50 and 100) on a
4-block model, and at 1x on an 8-block model, for the per-block reduction (``new``) and for the path that holds
every block's weights (``old``: all blocks' (batch, head, T, T) stacked, then reduced, as ``heads.score`` did before).
Each run is a child process that loads the model, warms up, resets its peak resident set (``/proc/self/clear_refs``)
and reports the peak growth during the call (MiB); glibc's mmap threshold is fixed at 128 KiB there, so every freed
tensor goes back to the system at once and the resident peak follows the live tensors (with the default, adaptive
threshold the same run varied by 60%). tracemalloc cannot measure this: torch allocates CPU tensors outside Python's
allocator, so tracemalloc sees none of them.

The last line printed is one JSON object.

    python benchmarks/heads.py              # ~15 min on a 2-core CPU
    python benchmarks/heads.py --quick      # n=16 and no common-loop timing
    python benchmarks/heads.py --memory-only    # only the tiny-model memory runs (~3 min, 8 child processes)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

# This script's folder would shadow the ``heads`` package when run as ``python benchmarks/heads.py``; the checkout
# it belongs to is measured (and holds the tiny models' tokenizer builder, tests/conftest.py).
ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from heads import scores  # noqa: E402

from extraction.capture import position_ids  # noqa: E402
from extraction.models import load_model  # noqa: E402
from heads.interventions import ablate  # noqa: E402
from heads.prompting import prompt_batches  # noqa: E402
from heads.selection import parse_heads  # noqa: E402
from heads.sweeps import sweep  # noqa: E402
from tests.conftest import build_tiny_llama  # noqa: E402


def timed(run):
    """(result, wall seconds, CPU seconds of this process)."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = run()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def default_subset(n_layers: int, n_heads: int) -> list[tuple[int, int]]:
    """One head from each quarter of the depth, cycling through head indices."""
    layers = sorted({int(round(q * (n_layers - 1))) for q in (0, 1 / 3, 2 / 3, 1)})
    return [(layer, i % n_heads) for i, layer in enumerate(layers)]


def on_heads(result, name: str, heads: list[tuple[int, int]]) -> np.ndarray:
    """A sweep variable's values at the given heads, stacked."""
    return np.stack([result[name].sel(block=block, head=head).values for block, head in heads])


@torch.no_grad()
def common_loop_seconds(loaded, args: argparse.Namespace, head: tuple[int, int]) -> float:
    """Seconds of one head of the common loop: full logits at every position, last row picked afterwards."""
    reference = prompt_batches(loaded, shots=args.shots, n=args.n, seed=0, batch_size=args.batch_size)
    start = time.perf_counter()
    with ablate(loaded, [head]):
        for _, encoded in reference.batches:
            mask = encoded.attention_mask
            loaded.model(input_ids=encoded.input_ids, attention_mask=mask, position_ids=position_ids(mask),
                         use_cache=False).logits[:, -1, reference.label_tokens]
    return time.perf_counter() - start


MEMORY_BATCH = 8
MEMORY_RUNS = [(4, 1), (4, 2), (4, 4), (8, 1)]  # (blocks, prompt-length factor)


def _resident_mib(field: str) -> float:
    status = Path("/proc/self/status").read_text()
    return next(int(line.split()[1]) for line in status.splitlines() if line.startswith(field + ":")) / 1024


def materialised(original):
    """``reduce_attention`` as before per-block reduction: every block's weights kept, stacked, then reduced."""
    def reduce_after_all(loaded, input_ids, attention_mask, reduce):
        weights = original(loaded, input_ids, attention_mask, lambda w: {"weights": w.float()})["weights"]
        return {name: value.cpu() for name, value in reduce(weights).items()}
    return reduce_after_all


def child_score_memory(folder: str, path: str, factor: int) -> None:
    """Print the peak resident growth (MiB) of one ``heads.score`` call, and the prompt length in tokens."""
    import gc

    from heads.prompting import prompt_batches

    loaded = load_model(folder)
    if path == "old":
        scores.reduce_attention = materialised(scores.reduce_attention)
    shots, repeat = 8 * factor, 25 * factor
    settings = dict(n=MEMORY_BATCH, n_random=MEMORY_BATCH, batch_size=MEMORY_BATCH, progress=False)
    scores.score(loaded, shots=1, repeat=3, **{**settings, "n": 2, "n_random": 2})  # warm-up
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # the peak resident set restarts from here
    before = _resident_mib("VmRSS")
    scores.score(loaded, shots=shots, repeat=repeat, **settings)
    peak = _resident_mib("VmHWM") - before
    tokens = max(encoded.input_ids.shape[1] for _, encoded in
                 prompt_batches(loaded, shots=shots, n=MEMORY_BATCH, batch_size=MEMORY_BATCH).batches)
    print(json.dumps({"peak_mib": peak, "tokens": tokens}))


def score_memory() -> dict:
    """Peak memory of ``heads.score`` on tiny models: per-block reduction vs all blocks' weights, see the docstring."""
    import subprocess
    import tempfile

    runs, env = [], {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    with tempfile.TemporaryDirectory() as root:
        folders = {blocks: build_tiny_llama(Path(root) / f"blocks{blocks}", blocks, heads=8, kv_heads=8)
                   for blocks in sorted({b for b, _ in MEMORY_RUNS})}
        for blocks, factor in MEMORY_RUNS:
            for path in ("new", "old"):
                command = [sys.executable, __file__, "--child-score-memory", str(folders[blocks]), path, str(factor)]
                output = subprocess.run(command, capture_output=True, text=True, check=True, env=env).stdout
                runs.append({"path": path, "blocks": blocks, "length": factor, "heads": 8, "batch": MEMORY_BATCH,
                             **json.loads(output.strip().splitlines()[-1])})
    peak = {(r["path"], r["blocks"], r["length"]): r["peak_mib"] for r in runs}
    tokens = {r["length"]: r["tokens"] for r in runs}
    return {
        "runs": runs,
        "attention_mib_per_block": {f"{f}x": MEMORY_BATCH * 8 * tokens[f] ** 2 * 4 / 2 ** 20 for f in tokens},
        **{f"{path}_{f}x_over_1x": peak[(path, 4, f)] / peak[(path, 4, 1)] for path in ("new", "old") for f in (2, 4)},
        **{f"{path}_8_blocks_over_4": peak[(path, 8, 1)] / peak[(path, 4, 1)] for path in ("new", "old")},
        "old_over_new_4x": peak[("old", 4, 4)] / peak[("new", 4, 4)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=64, help="prompts (default 64)")
    parser.add_argument("--shots", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8, help="rows per forward pass, both methods (default 8)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--naive-heads", default=None,
                        help="heads of the naive loop as L.H,L.H or 'all' (default: one per quarter of the depth)")
    parser.add_argument("--quick", action="store_true", help="n=16 and no common-loop timing")
    parser.add_argument("--memory-only", action="store_true", help="only the tiny-model memory runs of heads.score")
    parser.add_argument("--child-score-memory", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_score_memory:
        folder, path, factor = args.child_score_memory
        child_score_memory(folder, path, int(factor))
        return
    if args.memory_only:
        print(json.dumps({"memory": score_memory()}))
        return
    if args.quick:
        args.n = 16
    loaded = load_model(dtype=args.dtype)
    arch = loaded.arch
    all_heads = [(l, h) for l in range(arch.n_layers) for h in range(arch.n_heads)]
    subset = (all_heads if args.naive_heads == "all" else
              parse_heads(args.naive_heads) if args.naive_heads else default_subset(arch.n_layers, arch.n_heads))
    common = dict(task="sentiment", shots=args.shots, n=args.n, seed=0, batch_size=args.batch_size, progress=False)
    sweep(loaded, **{**common, "n": args.batch_size}, heads=subset[:1], method="naive")  # warm-up
    load_before = os.getloadavg()[0]

    naive_runs = [timed(lambda: sweep(loaded, method="naive", heads=subset, **common))]
    fast, fast_wall, fast_cpu = timed(lambda: sweep(loaded, method="fast", **common))
    print(json.dumps({"fast_s": fast_wall, "fast_cpu_s": fast_cpu}), flush=True)
    naive_runs.append(timed(lambda: sweep(loaded, method="naive", heads=subset, **common)))
    naive = naive_runs[0][0]
    naive_wall, naive_cpu = (float(np.mean([run[i] for run in naive_runs])) for i in (1, 2))
    scale = (len(all_heads) + 1) / (len(subset) + 1)
    diffs = {name: float(np.abs(on_heads(fast, name, subset) - on_heads(naive, name, subset)).max())
             for name in ("label_logits", "logit_diff", "accuracy")}
    clean_diff = float(np.abs(fast["clean_label_logits"].values - naive["clean_label_logits"].values).max())
    L, H = arch.n_layers, arch.n_heads
    result = {
        "device": "cpu", "threads": torch.get_num_threads(), "dtype": args.dtype, "model_layers": L, "model_heads": H,
        "prompts": args.n, "shots": args.shots, "batch_size": args.batch_size,
        "fast_heads": len(all_heads), "fast_s": fast_wall, "fast_cpu_s": fast_cpu,
        "naive_heads_timed": [list(h) for h in subset], "naive_subset_s": naive_wall,
        "naive_subset_runs_s": [run[1] for run in naive_runs], "naive_subset_cpu_s": naive_cpu,
        "naive_all_heads_s": naive_wall * scale, "naive_extrapolated": len(subset) < len(all_heads),
        "sweep_speedup": naive_wall * scale / fast_wall, "sweep_speedup_cpu": naive_cpu * scale / fast_cpu,
        "work_ratio": (L * H + 1) * L / (L + H * L * (L + 1) / 2),
        "max_abs_diff": diffs["label_logits"], "max_abs_diff_logit_diff": diffs["logit_diff"],
        "accuracy_mismatches": diffs["accuracy"], "max_abs_diff_clean": clean_diff,
        "load_average": [load_before, os.getloadavg()[0]],
        "clean_accuracy": fast.attrs["clean_accuracy"],
        "most_harmful_heads": fast["logit_diff"].to_dataframe().nsmallest(5, "logit_diff").reset_index()[
            ["block", "head", "logit_diff"]].to_dict(orient="records"),
    }
    if not args.quick:
        per_head = common_loop_seconds(loaded, args, subset[0])
        result.update(common_loop_s_per_head=per_head,
                      speedup_vs_common_loop=per_head * (len(all_heads) + 1) / fast_wall)
    result["memory"] = score_memory()
    result["targets"] = {"sweep_speedup": ">= 4", "max_abs_diff": "<= 1e-4"}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
