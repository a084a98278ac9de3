"""``icl-geometry train``: train a lab run from a preset and an optional TOML file (resumable), then analyse it
(:func:`training_lab.report.analyse`: tables, figures, ``report.html``); or, with ``--experiment``, train an
experiment set (:mod:`training_lab.experiments`) and compare its runs (:mod:`training_lab.compare`)."""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from icl_geometry.config import dump_toml
from training_lab.ablation import ablate_heads, summary
from training_lab.report import analyse, phase_sentences
from training_lab.config import PRESETS, LabConfig, overlay, preset
from training_lab.errors import LabError
from training_lab.compare import compare_experiment
from training_lab.experiments import experiment_names, load_experiment, run_experiment
from training_lab.train import train

EXAMPLES = """
examples:
  # the quick preset: [M]'s task scaled down, two phases in a few minutes on a laptop CPU
  icl-geometry train --preset quick --out lab-quick

  # [M]'s setting with three seeds trained at once (hours on a 2-core CPU; re-run the command to resume)
  icl-geometry train --preset paper --seeds 0 1 2 --out lab-paper

  # that run, trained with --steps 80000, continued to 200,000 steps (every other setting as before)
  icl-geometry train --preset paper --seeds 0 1 2 --steps 200000 --out lab-paper

  # your own setting: write a preset to a file, edit it, run it (keys left out keep the preset's values)
  icl-geometry train --preset quick --print-config > lab.toml
  icl-geometry train lab.toml --preset quick --out my-lab

  # re-analyse a run (also one still training, or killed) without training further
  icl-geometry train --out lab-quick --analyse-only --smooth 9
  icl-geometry train --out lab-paper --analyse-only --phase-window 2000   # [M]'s rule over 2,000 steps

  # per-head ablation at a checkpoint (the latest without --at-step): single heads and each block's heads jointly
  icl-geometry train --out lab-singh --ablate-heads --at-step 5000

A run directory holds run.zarr (curves and snapshots), checkpoints/, tables/*.csv, figures/ and report.html (open
it in a browser). Running the same command again continues an interrupted run, and with a larger --steps extends a
run; any other change of config for an existing run directory is refused.

experiment sets ([S]'s clamp runs, data sweeps; each configuration's seeds trained at once, phase changes compared):
  icl-geometry train --experiment singh-clamps --quick --out singh-clamps-quick   # minutes
  icl-geometry train --experiment singh-data --out singh-data   # [S]'s scale; re-run to resume
  icl-geometry train --experiment singh-clamps --quick --print-config   # see every configuration
  icl-geometry train --experiment my-set.toml --out my-set       # your own set (see training_lab/experiments.py)
  icl-geometry train --experiment singh-data --out singh-data --analyse-only   # compare again, no training

An experiment directory holds one run directory per configuration, tables/ (phase-change times per configuration
with 95% t intervals over seeds), comparison.json, figures/ and compare.html.
"""


def load_lab_config(path: str | Path | None, base: LabConfig) -> LabConfig:
    """``base`` with the sections and keys of the TOML file at ``path`` (None: ``base`` itself); unknown sections
    or keys, wrong types and impossible settings fail with one line."""
    if path is None:
        return base
    path = Path(path)
    try:
        raw: dict[str, Any] = tomllib.loads(path.read_text())
    except OSError as error:
        raise LabError(f"cannot read the config file {path}: {error.strerror}") from error
    except tomllib.TOMLDecodeError as error:
        raise LabError(f"{path} is not valid TOML: {error}") from error
    merged = overlay(base.to_dict(), raw, str(path))
    try:
        return LabConfig.from_dict(merged)
    except (TypeError, ValueError) as error:
        raise LabError(f"{path}: a value has the wrong type ({error}); compare with --print-config") from error


def effective_config(args: argparse.Namespace) -> LabConfig:
    config = load_lab_config(args.config, preset(args.preset))
    changes: dict[str, Any] = {}
    if args.seeds is not None:
        changes["seeds"] = args.seeds
    if args.steps is not None:
        changes["steps"] = args.steps
    if changes:
        merged = config.to_dict()
        merged["train"].update(changes)
        config = LabConfig.from_dict(merged)
    return config


def run_ablation(out: Path, step: int | None, ablation: str) -> int:
    """Write ``tables/head_ablation_step_<step>.csv`` for the run in ``out`` and print its summary."""
    table = ablate_heads(out, step, ablation=ablation)
    path = out / "tables" / f"head_ablation_step_{int(table['step'].iloc[0])}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(path, index=False)
    print("\n".join(summary(table)))
    print(f"table: {path}")
    return 0


def run_train(args: argparse.Namespace) -> int:
    if args.threads < 1:
        raise LabError(f"--threads must be at least 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    if args.experiment is not None:
        return run_experiment_command(args)
    if args.quick:
        raise LabError("--quick scales an --experiment; for one run pick a quick preset (--preset singh-quick)")
    out = Path(args.out or (Path(args.config).stem if args.config else f"lab-{args.preset}"))
    if args.ablate_heads:
        return run_ablation(out, args.at_step, args.ablation)
    if not args.analyse_only:
        config = effective_config(args)
        if args.print_config:
            print(dump_toml(config), end="")
            return 0
        train(config, out, progress=not args.no_progress)
    say = None if args.no_progress else (lambda message: print(f"analysing: {message}", flush=True))
    result = analyse(out, smooth=args.smooth, window=args.phase_window, threshold=args.phase_threshold,
                     rise=args.circuit_rise, progress=say)
    print("\n".join(phase_sentences(out)))
    print(f"tables: {out / 'tables'}\nreport: {result.report}")
    return 0


def run_experiment_command(args: argparse.Namespace) -> int:
    """Train (resumably) and compare the experiment ``args.experiment``; print the comparison and the times."""
    if args.config is not None:
        raise LabError("give either a config file or --experiment (an experiment file names its own configs)")
    experiment = load_experiment(args.experiment, quick=args.quick, seeds=args.seeds, steps=args.steps)
    if args.print_config:
        for name, config in experiment.configurations.items():
            print(f"# configuration {name}\n{dump_toml(config)}")
        return 0
    out = Path(args.out or (experiment.name + ("-quick" if args.quick else "")))
    if not args.analyse_only:
        say = None if args.no_progress else (lambda message: print(message, flush=True))
        timings = run_experiment(experiment, out, progress=not args.no_progress, say=say)
        for name, seconds in timings["configurations"].items():
            print(f"trained {name} in {seconds:.1f} seconds")
        print(f"the experiment took {timings['total']:.1f} seconds")
    page = compare_experiment(out, geometry=args.geometry)
    table = pd.read_csv(out / "tables" / "comparison.csv")
    print(table[["configuration", "n_seeds", "n_reached", "mean_step", "ci_low", "ci_high"]].to_string(index=False))
    print(f"tables: {out / 'tables'}\ncompare page: {page}")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train", help="train small transformers on [M]'s in-context task and report their phases and geometry",
        description="Train an attention-only transformer (several seeds at once) on [M]'s synthetic in-context\n"
                    "task, storing curves, attention patterns and hidden states over training; then detect the\n"
                    "training phases, name each phase's attention circuit, measure the hidden states' geometry\n"
                    "over training and write tables, figures and a self-contained report.html.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", nargs="?", help="TOML file with [task], [model] and [train] keys overriding the "
                                                  "preset's (see --print-config)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="paper",
                        help="starting config (default: paper, [M]'s setting, 1e6 steps)")
    parser.add_argument("--out", help="run directory (default: lab-PRESET, or the config file's name)")
    parser.add_argument("--experiment", metavar="NAME|FILE",
                        help="train an experiment set, one batched run per configuration, and compare them (with "
                             f"--analyse-only: compare only); shipped: {', '.join(experiment_names())} (default "
                             "--out: its name)")
    parser.add_argument("--geometry", action="store_true",
                        help="with --experiment: also compare each configuration's query geometry over training "
                             "(separability and alignment at the read-out; about a second per snapshot and seed)")
    parser.add_argument("--quick", action="store_true",
                        help="with --experiment: its quick scale (its [quick] preset and seeds; minutes)")
    parser.add_argument("--seeds", type=int, nargs="+", metavar="SEED", help="seeds trained at once (batched)")
    parser.add_argument("--steps", type=int, help="SGD steps to train (part of the config; a run directory holds "
                                                  "one config, but a larger --steps extends its run)")
    parser.add_argument("--smooth", type=int, default=5,
                        help="moving average (odd number of evaluations) the phase rule is applied to (default 5)")
    parser.add_argument("--phase-window", type=int, default=100, metavar="STEPS",
                        help="[M]'s phase rule: a boundary where Acc(t + STEPS) - Acc(t) > the threshold (default "
                             "100, [M]'s; rises spread over thousands of steps need a wider window)")
    parser.add_argument("--phase-threshold", type=float, default=0.025,
                        help="[M]'s phase rule's accuracy rise (default 0.025)")
    parser.add_argument("--circuit-rise", type=float, default=0.1, metavar="RISE",
                        help="a phase names the next circuit when its metrics rose by RISE over the previous "
                             "phase's, even below the absolute thresholds (default 0.1)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: the lab's matrices are small, and on a 2-core CPU a "
                             "second thread made the quick preset twice as slow)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--print-config", action="store_true", help="print the effective config as TOML and exit")
    parser.add_argument("--analyse-only", action="store_true", help="analyse the run in --out without training")
    parser.add_argument("--ablate-heads", action="store_true",
                        help="ablate each head alone and each block's heads jointly at a checkpoint of the run in "
                             "--out (no training); writes tables/head_ablation_step_STEP.csv")
    parser.add_argument("--at-step", type=int, metavar="STEP",
                        help="checkpoint step for --ablate-heads (default: the latest; train.keep_checkpoints "
                             "keeps every one)")
    parser.add_argument("--ablation", choices=("zero", "mean"), default="zero",
                        help="what replaces an ablated head's output (default zero)")
    parser.set_defaults(func=run_train)
