"""Benchmark of clamped lab runs: S seeds of one configuration of an experiment set (default: singh-clamps' ``A+B``
at its quick scale) trained as one batched run against the same S runs trained separately, one after another.

Timed in interleaved rounds in one process, medians over rounds:

- ``batched``: one :class:`training_lab.Trainer` holding all S seeds: a training step (batch generation for every
  run, the clamps, one batched forward/backward/update);
- ``separate``: S trainers of one seed each, one step each (what S separate runs cost per step);
- ``free``: the batched step without the configuration's clamps (``clamp_overhead`` = batched / free).

``ratio`` = (seed-steps per second batched) / (seed-steps per second separate). Correctness: after the timed steps
every batched run and its separate twin have taken the same steps on the same data from the same initial weights;
``max_weight_difference`` is the largest difference between their weights. The machine's load average is recorded
since it may be shared. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:] = [str(HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != HERE]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from training_lab import Trainer  # noqa: E402
from training_lab.experiments import load_experiment  # noqa: E402


def timed(trainers: list[Trainer], steps: int, done: int) -> float:
    """Seconds per step of ``trainers`` (each one step per step), ``done`` steps taken before."""
    start = time.perf_counter()
    for step in range(done, done + steps):
        for trainer in trainers:
            trainer._step(step)
    return (time.perf_counter() - start) / steps


def max_weight_difference(batched: Trainer, separate: list[Trainer]) -> float:
    worst = 0.0
    for run, twin in enumerate(separate):
        for name, weight in batched.model.named_weights().items():
            difference = (weight[run] - twin.model.named_weights()[name][0]).abs().max().item()
            worst = max(worst, difference)
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experiment", default="singh-clamps")
    parser.add_argument("--configuration", default="A+B")
    parser.add_argument("--full", action="store_true", help="the experiment's full scale (default: --quick's)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    experiment = load_experiment(args.experiment, quick=not args.full, seeds=range(args.seeds))
    config = experiment.configurations[args.configuration]
    batched = Trainer(config, "unused")
    separate = [Trainer(config.with_seeds([seed]), "unused") for seed in config.train.seeds]
    free = Trainer(replace(config, clamps=()), "unused")
    groups = {"batched": [batched], "separate": separate, "free": [free]}
    times: dict[str, list[float]] = {name: [] for name in groups}
    done = 1
    for trainers in groups.values():  # warm-up
        timed(trainers, 1, 0)
    for _ in range(args.rounds):
        for name, trainers in groups.items():
            times[name].append(timed(trainers, args.steps, done))
        done += args.steps
    batched_s, separate_s, free_s = (float(np.median(times[name])) for name in ("batched", "separate", "free"))
    print(json.dumps({
        "experiment": experiment.name, "configuration": args.configuration, "scale": "full" if args.full else "quick",
        "clamps": [spec.to_dict() for spec in config.clamps], "seeds": args.seeds,
        "batch_size": config.train.batch_size, "threads": args.threads, "load_average": os.getloadavg()[0],
        "rounds": args.rounds, "steps_per_round": args.steps,
        "batched_seconds_per_step": batched_s, "separate_seconds_per_step": separate_s,
        "free_batched_seconds_per_step": free_s,
        "batched_seed_steps_per_second": args.seeds / batched_s,
        "separate_seed_steps_per_second": args.seeds / separate_s,
        "ratio": separate_s / batched_s, "clamp_overhead": batched_s / free_s,
        "max_weight_difference": max_weight_difference(batched, separate),
    }))


if __name__ == "__main__":
    main()
