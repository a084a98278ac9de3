"""Edge scan: the fast scan against the naive one-forward-per-cell loop on the same prompts, in one run.

Both knock out every edge type (``extraction.edges.EDGE_TYPES``) over every window of ``--width`` blocks on the same
length-sorted batches of ``--n`` ``--shots``-shot ``sentiment`` prompts (``heads.flow.scan``):

* fast: one clean pass per batch records every block's call; per window, blocks w..L-1 re-run from block w's
  recorded input with one stacked copy per edge type;
* naive: one full forward pass (last-position logits only) per (edge type, window) cell, plus one clean pass.

``ratio`` is the naive loop's wall time over the fast scan's (rounds interleaved: fast, naive, fast, naive...; the
medians are compared); ``work_ratio`` is the naive loop's block evaluations over the fast scan's
(``E * W * L / (E * sum over windows of (L - first block))``, clean passes aside): the speed-up that sharing the
blocks below each window can give. ``max_abs_diff`` is the largest difference of any label logit between the two.

With ``--patch DONOR`` both patch the edges from donor prompts instead (``mode="patch"``; the fast scan adds one
donor pass per batch, the naive loop one per cell).

By default the model is a tiny random Llama (8 blocks, built in a temporary folder with the tests' word tokenizer);
``--real`` uses the default model (Gemma 3 270M) on a few prompts. The last line printed is one JSON object.

    python benchmarks/flow.py               # tiny model, ~1 min on a 2-core CPU
    python benchmarks/flow.py --real        # Gemma 3 270M, 8 prompts
    python benchmarks/flow.py --patch shuffled   # patching from prompts with shuffled labels
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# This script's folder would shadow the ``heads`` package; the checkout it belongs to is measured.
ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from extraction.models import load_model  # noqa: E402
from heads.flow import edge_scan  # noqa: E402
from tests.conftest import build_tiny_llama  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--real", action="store_true", help="Gemma 3 270M instead of the tiny model")
    parser.add_argument("--n", type=int, default=None, help="prompts (default 16 tiny, 8 real)")
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--width", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--patch", default=None, metavar="DONOR", help="patch from this donor spec, not knock out")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    with tempfile.TemporaryDirectory() as folder:
        spec = None if args.real else str(build_tiny_llama(Path(folder), blocks=8))
        loaded = load_model(spec)
        n = args.n or (8 if args.real else 16)
        settings = dict(task="sentiment", shots=args.shots, n=n, width=args.width, batch_size=args.batch_size,
                        n_boot=10, progress=False, mode="patch" if args.patch else "knockout", donor=args.patch)
        edge_scan(loaded, method="fast", **{**settings, "n": min(n, 2)})  # warm-up
        times: dict[str, list[float]] = {"fast": [], "naive": []}
        results = {}
        for _ in range(args.rounds):
            for method in ("fast", "naive"):
                start = time.perf_counter()
                results[method] = edge_scan(loaded, method=method, **settings)
                times[method].append(time.perf_counter() - start)
        fast, naive = results["fast"], results["naive"]
        report = {
            "model": "gemma-3-270m" if args.real else "tiny-llama-8-blocks",
            "mode": fast.attrs["mode"], "donor": fast.attrs["donor"],
            "n_prompts": n, "shots": args.shots, "width": args.width,
            "edges": len(fast["edge"]), "windows": len(fast["window"]),
            "fast_s": round(statistics.median(times["fast"]), 3),
            "naive_s": round(statistics.median(times["naive"]), 3),
            "ratio": round(statistics.median(times["naive"]) / statistics.median(times["fast"]), 2),
            "work_ratio": round(len(fast["window"]) * loaded.arch.n_layers
                                / sum(loaded.arch.n_layers - int(w) for w in fast["window"].values), 2),
            "max_abs_diff": float(np.abs(fast["label_logits"].values - naive["label_logits"].values).max()),
            "same_top_tokens": bool((fast["top_token"].values == naive["top_token"].values).all()),
            "rounds": args.rounds, "load_average": os.getloadavg()[0],
        }
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
