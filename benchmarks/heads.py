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
The last line printed is one JSON object.

    python benchmarks/heads.py              # ~15 min on a 2-core CPU
    python benchmarks/heads.py --quick      # n=16 and no common-loop timing
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

# This script's folder would shadow the ``heads`` package when run as ``python benchmarks/heads.py``.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from extraction.capture import position_ids  # noqa: E402
from extraction.models import load_model  # noqa: E402
from heads.interventions import ablate  # noqa: E402
from heads.prompting import prompt_batches  # noqa: E402
from heads.selection import parse_heads  # noqa: E402
from heads.sweeps import sweep  # noqa: E402


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
    return np.stack([result[name].sel(layer=layer, head=head).values for layer, head in heads])


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=64, help="prompts (default 64)")
    parser.add_argument("--shots", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8, help="rows per forward pass, both methods (default 8)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--naive-heads", default=None,
                        help="heads of the naive loop as L.H,L.H or 'all' (default: one per quarter of the depth)")
    parser.add_argument("--quick", action="store_true", help="n=16 and no common-loop timing")
    args = parser.parse_args()
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
            ["layer", "head", "logit_diff"]].to_dict(orient="records"),
    }
    if not args.quick:
        per_head = common_loop_seconds(loaded, args, subset[0])
        result.update(common_loop_s_per_head=per_head,
                      speedup_vs_common_loop=per_head * (len(all_heads) + 1) / fast_wall)
    result["targets"] = {"sweep_speedup": ">= 4", "max_abs_diff": "<= 1e-4"}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
