"""``icl-geometry measure`` and ``icl-geometry plot``: the layer sweep and its figures from the command line."""

from __future__ import annotations

import argparse
from pathlib import Path

MEASURE_EXAMPLES = """
examples:
  # every measure at every layer of every group in the store, 1,000 bootstrap resamples
  icl-geometry measure results/store.zarr

  # only the ICL and zero-shot groups, a quick run, the table written where you want it
  icl-geometry measure results/store.zarr --group icl zero_shot --n-boot 200 --out results/measures.csv

Measures (per layer): separability (held-out accuracy of a logistic-regression probe), output_alignment
(logit-lens accuracy), singular / variance / mean / composite alignment of the class structure with the label
words' unembedding direction d = (E_A - E_B)/||E_A - E_B|| (averaged over label pairs), effective_dimension
(participation ratio) and denoising_gain (label accuracy of the rank-R reconstruction minus that of the raw
states). Values come with 95% stratified-bootstrap CIs (separability: 50 resamples, each a new probe fit).
The table printed is the value per layer; the CSV (columns group, layer, measure, value, ci_low, ci_high,
normalize_variance) also holds the CIs and the group's accuracy and label_accuracy. Variance alignment is the
share of the pair's variance along d; --raw-variance gives [Y]'s appendix form d^T (H^T H / n) d on the centred
states instead (and composite alignment built on it); the CSV's normalize_variance column says which. The
transition is the layer after the separability plateau where composite alignment rises most steeply.
"""

PLOT_EXAMPLES = """
examples:
  icl-geometry plot results/store.zarr
  icl-geometry plot results/store.zarr --group icl zero_shot --layers 3 9 12 18 --format png --out figures/

Writes measures.{png,svg} (one panel per measure, every group on shared axes, 95% CI bands, dashed lines at
each group's transition), effective_dimension.{png,svg} and projections_GROUP.{png,svg} (PCA and UMAP of the
query states at the chosen layers, coloured by gold class; default: four evenly spaced layers).
"""

#: Short column names of the printed table.
SHORT = {
    "separability": "sep", "output_alignment": "out", "singular_alignment": "sing", "variance_alignment": "var",
    "mean_alignment": "mean", "composite_alignment": "comp", "effective_dimension": "eff_dim",
    "denoising_gain": "denoise",
}


def _default_out(store: str, suffix: str) -> Path:
    path = Path(store)
    return path.with_name(f"{path.stem}{suffix}")


def _sweep_kwargs(args: argparse.Namespace) -> dict:
    return dict(n_boot=args.n_boot, seed=args.seed, rank=args.rank, measures=args.measures,
                normalize_variance=not args.raw_variance, engine=args.engine)


def run_measure(args: argparse.Namespace) -> int:
    from geometry.sweep import measure_groups, tidy, write_csv
    from geometry.transition import transition

    results = measure_groups(args.store, args.group, **_sweep_kwargs(args))
    path = write_csv(tidy(list(results.values())), args.out or _default_out(args.store, "_measures.csv"))
    for name, result in results.items():
        frame = result["value"].to_pandas().rename(columns=SHORT)
        print(f"== {name}: accuracy {result.attrs['accuracy']:.3f}, label accuracy "
              f"{result.attrs['label_accuracy']:.3f}, n={result.attrs['n_examples']}")
        print(frame.to_string(float_format=lambda v: f"{v:.3f}"))
        if {"separability", "composite_alignment"} <= set(result["measure"].values):
            found = transition(result, min_rise=args.min_rise)
            print(f"transition: layer {found.layer} (separability plateau from layer {found.plateau_layer})")
    print(f"wrote {path}")
    return 0


def run_plot(args: argparse.Namespace) -> int:
    from geometry.plots import plot_store

    paths = plot_store(args.store, args.group, args.out or _default_out(args.store, "_figures"), layers=args.layers,
                       formats=args.format, min_rise=args.min_rise, **_sweep_kwargs(args))
    for path in paths:
        print(path)
    return 0


def _common(parser: argparse.ArgumentParser) -> None:
    from geometry.names import MEASURES

    parser.add_argument("store", metavar="STORE", help="Zarr store written by icl-geometry extract")
    parser.add_argument("--group", nargs="+", default=None, metavar="G",
                        help="groups (settings) to measure (default: every group with hidden states)")
    parser.add_argument("--measures", nargs="+", default=None, choices=MEASURES, metavar="M",
                        help=f"measures to compute (default: all: {', '.join(MEASURES)})")
    parser.add_argument("--n-boot", type=int, default=1000, metavar="N",
                        help="bootstrap resamples for the 95%% CIs; 0 skips them (default: 1000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the resamples and the probe split (default: 0)")
    parser.add_argument("--rank", type=int, default=10, help="rank of the denoising reconstruction (default: 10)")
    parser.add_argument("--engine", default=None, choices=["states", "statistics"],
                        help="states: each layer in memory; statistics: chunked sufficient statistics, for stores "
                             "larger than memory (default: statistics for groups extracted with --keep statistics, "
                             "else states)")
    parser.add_argument("--raw-variance", action="store_true",
                        help="variance alignment as d^T (H^T H / n) d on centred states ([Y]'s appendix) instead of "
                             "the share of variance along d (default)")
    parser.add_argument("--min-rise", type=float, default=0.0, metavar="X",
                        help="smallest rise of composite alignment that counts as a transition (default: 0, any rise)")


def register(subparsers) -> None:
    """Add the ``measure`` and ``plot`` subcommands."""
    measure = subparsers.add_parser(
        "measure", help="separability, alignment and more at every layer, with bootstrap CIs",
        description="Measure the geometry of stored query states layer by layer; print a table and write a CSV.",
        epilog=MEASURE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(measure)
    measure.add_argument("--out", default=None, metavar="FILE.csv",
                         help="CSV to write (default: STORE's name + _measures.csv, next to it)")
    measure.set_defaults(func=run_measure)

    plot = subparsers.add_parser(
        "plot", help="figures of the layer-wise measures and of the query states",
        description="Measure the groups of a store and draw layer-wise curves and PCA/UMAP views.",
        epilog=PLOT_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(plot)
    plot.add_argument("--out", default=None, metavar="DIR", help="folder for the figures (default: STORE_figures)")
    plot.add_argument("--layers", nargs="+", type=int, default=None, metavar="L",
                      help="layers of the PCA/UMAP panels (default: four evenly spaced layers)")
    plot.add_argument("--format", nargs="+", default=["png", "svg"], choices=["png", "svg"],
                      help="figure formats (default: png svg)")
    plot.set_defaults(func=run_plot)
