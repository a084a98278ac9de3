"""Accuracy of the default model (Gemma 3 270M) on every built-in string-to-string task: the answer's first token and
exact greedy generation of the whole answer, 8-shot, 32 queries each (seed 0, template ``{input} -> {output}``).

Ambiguous tasks also report, per reading, the share of queries answered that way. The last line printed is one JSON
object.

    python benchmarks/pair_tasks.py                 # about 5 min on a 2-core CPU
    python benchmarks/pair_tasks.py --n 16 --shots 4
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# This folder holds a module named ``extraction``: import the project's packages from the checkout instead.
HERE = Path(__file__).resolve().parent
sys.path[:] = [str(HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != HERE]

from extraction.models import load_model
from extraction.pair_eval import evaluate_pair_task
from extraction.pair_tasks import list_pair_tasks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model spec (default: Gemma 3 270M)")
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--shots", type=int, default=8)
    args = parser.parse_args()
    loaded = load_model(args.model)
    report = {"model": loaded.spec, "n": args.n, "shots": args.shots, "tasks": {}}
    for name in list_pair_tasks():
        started = time.perf_counter()
        result = evaluate_pair_task(loaded, name, shots=args.shots, n=args.n, batch_size=16)
        entry = {"first_token": result.first_token_accuracy, "exact": result.exact_accuracy,
                 "seconds": round(time.perf_counter() - started, 1)}
        if result.reading_accuracy():
            entry["readings"] = result.reading_accuracy()
        report["tasks"][name] = entry
        print(name, entry, flush=True)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
