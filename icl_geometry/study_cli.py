"""``icl-geometry study``: the whole analysis from one optional config file, resumable, ending in ``report.html``."""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from icl_geometry.config import dump_toml, load_config

EXAMPLES = """
examples:
  # the paper's analysis of the bundled Gemma 3 270M on every built-in task (about 15 min on a 2-core CPU)
  icl-geometry study

  # a smoke run: one task, 24 queries (a few minutes)
  icl-geometry study --quick --out quick-study

  # your model and data: write the defaults to a file, edit it, run it
  icl-geometry study --print-config > study.toml
  icl-geometry study study.toml --out my-study

An interrupted study resumes where it stopped when the same command is run again. The output folder holds the
Zarr stores, tables/*.csv, figures/ and report.html (open it in a browser).
"""


def summary(folder: Path) -> str:
    """The short text printed at the end: accuracies, and separability / composite alignment per layer."""
    tables = folder / "tables"
    accuracy = pd.read_csv(tables / "accuracy.csv")
    measures = pd.read_csv(tables / "measures.csv")
    lines = []
    for task, rows in accuracy.groupby("task", sort=False):
        lines.append(f"\n== {task}: accuracy (whole vocabulary / label words only)")
        lines += [f"  {r.group:<14} k={r.shots:<3} {100 * r.accuracy:6.1f}%  {100 * r.label_accuracy:6.1f}%"
                  for r in rows.itertuples()]
        chosen = measures[(measures.task == task) & measures.group.isin(["icl", "zero_shot"])
                          & measures.measure.isin(["separability", "composite_alignment"])]
        wide = chosen.astype({"layer": int}).pivot_table(index="layer", columns=["measure", "group"], values="value")
        wide.columns = [f"{m[:4]}.{g}" for m, g in wide.columns]
        lines.append(f"== {task}: separability (sepa) and composite alignment (comp) per layer, ICL vs zero-shot")
        lines.append(wide.round(3).to_string())
    return "\n".join(lines)


def run_study(args: argparse.Namespace) -> int:
    from icl_geometry.study import Study

    config = load_config(args.config, quick=args.quick)
    if args.print_config:
        print(dump_toml(config), end="")
        return 0
    out = Path(args.out or ("icl-geometry-quick" if args.quick else "icl-geometry-study"))
    report = Study(config, out, progress=not args.no_progress, restart=args.restart).run()
    print(summary(out))
    print(f"\nstores: {out / 'stores'}\nreport: {report}")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "study", help="run the whole analysis (extraction, geometry, heads, interventions) and write a report",
        description="Extract ICL and zero-shot query states, measure separability and alignment at every layer, "
                    "score previous-token and induction heads, ablate them and inject task vectors, and write "
                    "tables, figures and a self-contained report.html.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", nargs="?", help="TOML or YAML study file (default: the paper's set-up)")
    parser.add_argument("--out", help="output folder (default: icl-geometry-study, or icl-geometry-quick)")
    parser.add_argument("--quick", action="store_true", help="smoke run: sentiment only, 24 queries, 100 resamples")
    parser.add_argument("--restart", action="store_true",
                        help="redo every stage in --out: store groups of the same settings are reused, groups "
                             "written with other settings are replaced")
    parser.add_argument("--print-config", action="store_true", help="print the effective config as TOML and exit")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=run_study)
