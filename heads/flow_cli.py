"""``icl-geometry flow``: attention-edge knockouts between position groups ([B], contextualize-then-aggregate)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from extraction.cli import add_cluster_arguments, cluster_options, prompt_kwargs
from heads.step_cli import StepCommand, load, print_json

DESCRIPTION = """Information flow between the positions of a few-shot prompt ([B] Bakalova et al.): block the
attention from one position group to another (pre-softmax score -inf, the rest renormalised) in a window of
consecutive blocks and see what breaks. Edge types (senders -> receivers):

  y->x      contextualization: output y_i -> later inputs x_j (j > i)
  y->y      output y_i -> later outputs y_j (j > i)
  x->y      within-example: input x_i -> its own output y_i
  y->final  aggregation: every output y_i -> the final position
  x->final  every input x_i -> the final position
  query->final   the query input -> the final position

[B]'s finding on Gemma-2 2B: contextualization edges matter in lower layers, aggregation edges in higher ones.
Tasks: the classification tasks (accuracy over the label words) and the string-to-string pair tasks
(capitalization, copying, past_tense, country_capital, person_sport, ambiguous_past_copying,
ambiguous_capitalization_copying, or --data FILE with input/output columns: the answer's first token and exact
generation of the whole answer).

Besides blocking an edge, you can patch it: the receivers read their senders' keys and values from a donor prompt
(DONOR: shuffled = same demonstrations, labels shuffled; demos:SEED = other demonstrations; task:NAME = another
task's demonstrations; an optional :SEED on each).
Run `icl-geometry flow STEP --help` for each step's options and examples."""

EXAMPLES = {
    "scan": """examples:
  # every edge type over every 3-block window, 32 8-shot sentiment prompts: CSV, Zarr and heat map in results/flow
  icl-geometry flow scan --n 32 --width 3 --out results/flow
  # two edge types only, wider windows, the model in bfloat16
  icl-geometry flow scan --edges y->x,y->final --width 4 --dtype bfloat16 --out results/flow
  # patch instead of block: the edges read from prompts whose demonstration labels are shuffled
  icl-geometry flow scan --patch shuffled --out results/flow-patch

  # a string-to-string task: the answer's first token per cell, exact generation of the clean run and of two cells
  icl-geometry flow scan --task country_capital --generate y->final@9,y->x@0 --out results/flow_capitals
  # your pairs (a .csv/.jsonl/.parquet with input and output columns; template with {input} and {output})
  icl-geometry flow scan --data pairs.csv --template "Q: {input} A: {output}" --out results/flow_mine

Writes OUT/flow.csv (one row per edge, window and quantity: value, low, high; window = first block, window_last
= last block), OUT/flow.zarr (the whole Dataset, per-prompt label logits included) and OUT/flow_heatmap.png
(window x edge: accuracy change and gold-label logit change, each cell with its bootstrap interval); the table's
mode and donor columns say whether edges were knocked out or patched, and from which donor. Prints a JSON summary
with the clean accuracy and the most harmful cells. Knockouts of one window share the clean pass below it.
Pair tasks: accuracy is the answer's first token (whole vocabulary), the logit that of this token; ambiguous tasks
add reading_<task> (the first token follows that task's answer); exact generation (exact, exact_<task>) is always
measured on the clean run and for the --generate cells (costly: one full pass per written token, no cache).
""",
    "knockout": """examples:
  # states of 64 8-shot prompts with aggregation (y->final) blocked in blocks 9-11, and every measure's change
  icl-geometry flow knockout results/store.zarr --edge y->final --window 9 --width 3 --out results/changes.csv
  # contextualization blocked in blocks 0-2 of heads 0 and 1 only
  icl-geometry flow knockout results/store.zarr --edge y->x --window 0 --heads 0,1

Writes the group knockout_<edge>_<first>-<last> (or --setting) like `icl-geometry extract`, with the knockout in
its attrs, extracts the clean group 'icl' with the same prompts if the store lacks it (or --baseline), measures
both with every geometry measure and writes the change (knockout - clean) per layer and measure as CSV (columns
group, baseline, layer, measure, value, baseline_value, change). Prints a JSON summary with both accuracies.
""",
    "patch": """examples:
  # 64 8-shot prompts whose final position reads y_i from prompts with shuffled labels (the default) in blocks 9-11
  icl-geometry flow patch results/store.zarr --edge y->final --window 9 --width 3 --out results/patch.csv
  # contextualization patched from other demonstrations (seed 1) in blocks 0-2, heads 0 and 1 only
  icl-geometry flow patch results/store.zarr --edge y->x --window 0 --heads 0,1 --donor demos:1

Writes the group patch_<edge>_<first>-<last>_<donor> (or --setting) like `icl-geometry extract`, the edge patch and
its donor spec in its attrs (the donor prompts are rebuilt from the spec and the group's prompts), extracts the
clean group 'icl' with the same prompts if the store lacks it (or --baseline), and writes every geometry measure's
change (patched - clean) per layer as CSV, as `flow knockout` does. Donors whose sender groups tokenize to other
lengths than the base prompt's are refused before anything is written (x->y and x->final need donor 'shuffled').
""",
}


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _cells(text: str) -> list[tuple[str, int]]:
    """``y->final@9,y->x@0`` as [("y->final", 9), ("y->x", 0)]."""
    from heads.flow import parse_cell

    return [parse_cell(part) for part in _names(text)]


def run_scan(args: argparse.Namespace) -> int:
    from extraction.store import consolidate
    from geometry.plots import save
    from heads.flow import edge_scan, flow_table
    from heads.flow_plots import plot_flow

    started = time.perf_counter()
    kwargs = prompt_kwargs(args)
    ds = edge_scan(load(args), edges=_names(args.edges) if args.edges else None, width=args.width,
                   method=args.method, mode="patch" if args.patch else "knockout", donor=args.patch,
                   batch_size=args.batch_size, n_boot=args.n_boot, progress=not args.quiet,
                   generate=_cells(args.generate) if args.generate else (), **kwargs)
    table = flow_table(ds)
    summary = {"method": args.method, "mode": ds.attrs["mode"], "donor": ds.attrs["donor"],
               "seconds": round(time.perf_counter() - started, 1), "width": args.width,
               **{key: value for key, value in ds.attrs.items() if key.startswith("clean_")}}
    if args.out:
        folder = Path(args.out)
        folder.mkdir(parents=True, exist_ok=True)
        table.to_csv(folder / "flow.csv", index=False)
        ds.to_zarr(folder / "flow.zarr", mode="w", consolidated=False)
        consolidate(folder / "flow.zarr")  # opens with xarray.open_zarr's defaults, without a warning
        figures = save(plot_flow(ds), folder, "flow_heatmap", formats=("png",))
        summary["out"] = {"table": str(folder / "flow.csv"), "dataset": str(folder / "flow.zarr"),
                          "figures": [str(p) for p in figures]}
    change = table[table["quantity"] == "accuracy_change"]
    summary["most_harmful"] = change.nsmallest(5, "value")[["edge", "window", "window_last", "value", "low",
                                                            "high"]].to_dict(orient="records")
    print_json(summary)
    return 0


def run_knockout(args: argparse.Namespace) -> int:
    """``flow knockout`` and ``flow patch``: extract under the edge intervention, then every measure's change."""
    from extraction.edges import EdgeKnockout, EdgePatch
    from extraction.extractor import accuracy, extract
    from geometry.sweep import measure
    from heads.flow import knockout_group, patch_group
    from heads.pipeline import change_frame

    blocks = list(range(args.window, args.window + args.width))
    heads = [int(h) for h in _names(args.heads)] if args.heads else None
    origin = {"command": f"flow {args.flow_command}"}
    if args.flow_command == "patch":
        intervention = EdgePatch(args.edge, blocks, heads, donor=args.donor, origin=origin)
        group = args.setting or patch_group(args.edge, blocks, intervention.donor.text)
    else:
        intervention = EdgeKnockout(args.edge, blocks, heads, origin=origin)
        group = args.setting or knockout_group(args.edge, blocks)
    loaded = load(args)
    intervention.check(loaded.arch)
    kwargs = dict(batch_size=args.batch_size, progress=not args.quiet, **prompt_kwargs(args))
    # The intervention first: an edge with no positions in these prompts (or donors that do not align) fails before
    # anything else is written.
    with cluster_options(args) as cluster:
        changed = extract(loaded, args.store, setting=group, overwrite=args.overwrite, intervention=intervention,
                          **cluster, **kwargs)
        clean = extract(loaded, args.store, setting=args.baseline, **cluster, **kwargs)
    changes = change_frame(measure(changed, group, n_boot=args.n_boot, progress=not args.quiet),
                           measure(clean, args.baseline, n_boot=args.n_boot, progress=not args.quiet),
                           group, args.baseline)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        changes.to_csv(args.out, index=False)
    largest = changes.reindex(changes["change"].abs().sort_values(ascending=False).index).head(5)
    print_json({"store": args.store, "group": group, "baseline": args.baseline, "blocks": blocks, "heads": heads,
                "out": args.out, "accuracy": accuracy(changed), "baseline_accuracy": accuracy(clean),
                "largest_changes": largest[["layer", "measure", "change"]].to_dict(orient="records")})
    return 0


def _step_options(parser: argparse.ArgumentParser) -> None:
    """Options every flow step takes."""
    parser.add_argument("--width", type=int, default=3, help="blocks per window (default 3)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per forward pass (default 8)")
    parser.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the intervals (default "
                                                                 "1000; 0: none)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def register(subparsers) -> None:
    steps = StepCommand(subparsers, "flow", "knock out attention edges between prompt positions ([B])", DESCRIPTION,
                        EXAMPLES, _step_options)

    scan = steps.add("scan", "knock out every edge type over sliding block windows; table and heat map", run_scan,
                     store=False)
    scan.set_defaults(n=32)
    scan.add_argument("--edges", default=None, metavar="E,E", help="comma-separated edge types (default: all six)")
    scan.add_argument("--method", default="fast", choices=["fast", "naive"],
                      help="fast: share the clean pass below each window (default); naive: one pass per cell")
    scan.add_argument("--patch", default=None, metavar="DONOR",
                      help="patch the edges from donor prompts instead of knocking them out (shuffled, demos:SEED, "
                           "task:NAME; see `icl-geometry flow --help`)")
    scan.add_argument("--out", default=None, metavar="DIR", help="write flow.csv, flow.zarr and flow_heatmap.png here")
    scan.add_argument("--generate", default=None, metavar="E@B,E@B",
                      help="pair tasks: also generate whole answers under these knockouts, each an edge type and "
                           "the first block of its window (y->final@9); costly")

    knockout = steps.add("knockout", "extract states under one edge knockout; every measure's change", run_knockout)
    patch = steps.add("patch", "extract states under one edge patched from donor prompts; every measure's change",
                      run_knockout)
    patch.add_argument("--donor", default="shuffled", metavar="DONOR",
                       help="donor prompts: shuffled (default), demos:SEED or task:NAME (optional :SEED)")
    for step, name in ((knockout, "knockout"), (patch, "patch")):
        step.add_argument("--edge", required=True, help=f"the edge type to {'block' if step is knockout else 'patch'}"
                                                        " (see `icl-geometry flow --help`)")
        step.add_argument("--window", type=int, default=0, help="first block of the window (default 0)")
        step.add_argument("--heads", default=None, metavar="H,H", help="query heads to intervene on (default: all)")
        step.add_argument("--setting", default=None, help=f"group name (default {name}_<edge>_<first>-<last>"
                                                          f"{'_<donor>' if step is patch else ''})")
        step.add_argument("--baseline", default="icl", help="clean group to compare with (default icl)")
        step.add_argument("--overwrite", action="store_true", help="replace a group written with other settings")
        step.add_argument("--out", default=None, metavar="CSV", help="write the measure changes here")
        add_cluster_arguments(step)
