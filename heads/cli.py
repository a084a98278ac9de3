"""``icl-geometry heads``: score heads, ablate them, inject task vectors, sweep single heads, or run the whole study."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from extraction.cli import add_cluster_arguments, cluster_options, prompt_kwargs
from heads.step_cli import StepCommand, load, print_json

DESCRIPTION = """Attention heads behind in-context learning ([Y] Yang et al. 2025): previous-token (PTH) and
induction (IH) head scores, head ablation, task-vector injection, and their effect on the query hidden states layer
by layer. Run `icl-geometry heads STEP --help` for each step's options and examples."""

EXAMPLES = {
    "score": """examples:
  # PTH and IH scores of the default model (Gemma 3 270M) on 50 sentiment prompts, saved in the store
  icl-geometry heads score results/store.zarr --task sentiment --shots 8 --n 50

Scores (block x head; block b = decoder block b, 0-based): pth = attention k -> k-1 on zero-shot prompts from the
second token on (--no-pth-first-pair: from the third, leaving out the attention to <bos>); ih = attention from the
final ':' to the demonstration labels on k-shot prompts; previous_token / induction / duplicate_token = classic
detectors on repeated random tokens. Prints the top heads of each score as [block, head, score]. Saved as group
'head_scores' and re-used by later commands with the same settings.
""",
    "ablate": """examples:
  # 8-shot states with the top-10% IH heads zeroed (scores computed first if the store has none)
  icl-geometry heads ablate results/store.zarr --set ih
  # your own heads (BLOCK.HEAD), mean-ablated, into a group of your choice
  icl-geometry heads ablate results/store.zarr --set 5.1,9.3 --mode mean --setting ablate_mine

Writes one group (default ablate_<set>) like `icl-geometry extract` does, with the intervention in its attrs.
Compare it with the plain 'icl' group in `icl-geometry measure`.
""",
    "inject": """examples:
  # zero-shot states with the IH task vector added to the final position at state round(3L/8)
  icl-geometry heads inject results/store.zarr --vector ih
  # the PTH vector at state 2 (the default for pth)
  icl-geometry heads inject results/store.zarr --vector pth --layer 2

The task vector sums, over the top heads, each head's mean output at the final position of --n-score --shots-shot
prompts. State l is the store's layer l (0 = embedding output, l = output of block l-1).
""",
    "sweep": """examples:
  # effect of zero-ablating each head alone on 64 8-shot sentiment prompts, as a CSV
  icl-geometry heads sweep --n 64 --out results/sweep.csv
  # the same with one full forward pass per head (slower; same numbers)
  icl-geometry heads sweep --n 16 --method naive

Columns: block, head, logit_diff (change in mean gold-minus-best-other label logit), accuracy and
accuracy_change (label-restricted).
""",
    "study": """examples:
  # the full heads study on sentiment: scores, top sets, ablations, injections, measures, figures
  icl-geometry heads study results/store.zarr --figures results/heads
  # quicker: no geometry measures
  icl-geometry heads study results/store.zarr --n 32 --no-measures

Prints a JSON summary (sets as [block, head], their placement in depth, accuracy table); with --figures writes
the heat maps, the accuracy chart, the measure-change curves and accuracy.csv / measure_changes.csv into that
folder. Re-running re-uses every finished group.
""",
}


def _prompt_options(args: argparse.Namespace) -> dict:
    """Prompt settings other than task, shots, n and seed."""
    return {k: v for k, v in prompt_kwargs(args).items() if k not in ("task", "shots", "n", "seed")}


def _scores(args: argparse.Namespace, loaded, n: int):
    from heads.scores import score

    return score(loaded, task=args.data or args.task, shots=args.shots, n=n, seed=args.seed, store=args.store,
                 pth_first_pair=args.pth_first_pair, batch_size=args.batch_size,
                 overwrite=getattr(args, "overwrite_scores", False), **_prompt_options(args))


def _named_set(args: argparse.Namespace, loaded, name: str) -> list:
    from heads.selection import parse_heads, random_heads, select_sets

    if name not in ("ih", "pth", "random"):
        return parse_heads(name)
    sets = select_sets(_scores(args, loaded, args.n_score), fraction=args.fraction, k=args.k, overlap=args.overlap)
    if name != "random":
        return sets[name]
    arch = loaded.arch
    return random_heads(arch.n_layers, arch.n_heads, len(sets["ih"]), exclude=sets["pth"] + sets["ih"], seed=args.seed)


def run_score(args: argparse.Namespace) -> int:
    import numpy as np

    scores = _scores(args, load(args), args.n)
    top = {}
    for name in scores.data_vars:
        values = scores[name].values
        order = np.argsort(-values, axis=None, kind="stable")[:args.top]
        top[name] = [[int(i // values.shape[1]), int(i % values.shape[1]), round(float(values.flat[i]), 4)]
                     for i in order]
    print_json({"store": args.store, "group": "head_scores", "top": top})
    return 0


def run_ablate(args: argparse.Namespace) -> int:
    from extraction.extractor import accuracy, extract
    from extraction.interventions import HeadAblation
    from heads.task_vectors import head_means

    loaded = load(args)
    heads = _named_set(args, loaded, args.set)
    named = args.set in ("ih", "pth", "random")
    setting = args.setting or (f"ablate_{args.set}" if named else "ablate_heads")
    kwargs = prompt_kwargs(args)
    means = None
    if args.mode == "mean":
        means = head_means(loaded, **{**kwargs, "n": args.n_score}, batch_size=args.batch_size)
    ablation = HeadAblation(heads, args.mode, means, origin={"set": args.set if named else "custom"})
    with cluster_options(args) as cluster:
        dataset = extract(loaded, args.store, setting=setting, batch_size=args.batch_size, overwrite=args.overwrite,
                          intervention=ablation, **cluster, **kwargs)
    print_json({"store": args.store, "group": setting, "heads": heads, **accuracy(dataset)})
    return 0


def run_inject(args: argparse.Namespace) -> int:
    from extraction.extractor import accuracy, extract
    from extraction.interventions import Injection
    from heads.pipeline import injection_layer
    from heads.task_vectors import VECTOR_SPACE, task_vector

    loaded = load(args)
    heads = _named_set(args, loaded, args.vector)
    layer = args.layer if args.layer is not None else (
        injection_layer(loaded.arch.n_layers) if args.vector == "ih" else 2)
    kwargs = prompt_kwargs(args)
    vector = task_vector(loaded, heads, **{**kwargs, "n": args.n_score}, batch_size=args.batch_size)
    setting = args.setting or f"inject_{args.vector}"
    origin = {"vector": f"{args.vector} task vector", "space": VECTOR_SPACE, "heads": [list(h) for h in heads],
              "reference": {"shots": args.shots, "n": args.n_score, "seed": args.seed}}
    injection = Injection(vector, layer, origin=origin)
    with cluster_options(args) as cluster:
        dataset = extract(loaded, args.store, setting=setting, batch_size=args.batch_size, overwrite=args.overwrite,
                          intervention=injection, **cluster, **{**kwargs, "shots": 0})
    print_json({"store": args.store, "group": setting, "layer": layer, "heads": heads,
                "vector_norm": float(vector.norm()), **accuracy(dataset)})
    return 0


def run_sweep(args: argparse.Namespace) -> int:
    from heads.sweeps import sweep

    started = time.perf_counter()
    kwargs = prompt_kwargs(args)
    result = sweep(load(args), method=args.method, batch_size=args.batch_size, **kwargs)
    table = result[["logit_diff", "accuracy", "accuracy_change"]].to_dataframe().reset_index()
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.out, index=False)
    worst = table.nsmallest(5, "logit_diff")
    print_json({"out": args.out, "method": args.method, "seconds": round(time.perf_counter() - started, 1),
                "clean_accuracy": result.attrs["clean_accuracy"],
                "clean_logit_diff": result.attrs["clean_logit_diff"],
                "most_harmful": worst[["block", "head", "logit_diff", "accuracy"]].to_dict(orient="records")})
    return 0


def run_study(args: argparse.Namespace) -> int:
    from heads.plots import plot_study
    from heads.pipeline import study

    kwargs = prompt_kwargs(args)
    loaded = load(args)
    with cluster_options(args) as cluster:
        result = study(loaded, args.store, fraction=args.fraction, k=args.k, overlap=args.overlap,
                       n_score=args.n_score, pth_first_pair=args.pth_first_pair, mode=args.mode,
                       measures=not args.no_measures, n_boot=args.n_boot,
                       batch_size=args.batch_size, progress=not args.quiet, cluster=cluster, **kwargs)
    summary = result.summary()
    if args.figures:
        folder = Path(args.figures)
        summary["figures"] = [str(p) for p in plot_study(result, folder)]
        result.accuracy.to_csv(folder / "accuracy.csv")
        if result.changes is not None:
            result.changes.to_csv(folder / "measure_changes.csv", index=False)
    print_json(summary)
    return 0


def _score_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pth-first-pair", action=argparse.BooleanOptionalAction, default=True,
                        help="count the second token's attention to the first in the PTH score, as [Y] does "
                             "(default); --no-pth-first-pair leaves it out, like the classic detector")


def _selection_arguments(parser: argparse.ArgumentParser) -> None:
    _score_arguments(parser)
    group = parser.add_argument_group("head selection (named sets)")
    group.add_argument("--fraction", type=float, default=0.1, help="top fraction of all heads per score (default 0.1)")
    group.add_argument("--k", type=int, default=None, help="top k heads per score instead of a fraction")
    group.add_argument("--overlap", default="keep", choices=["keep", "pth", "ih"],
                       help="a head in both top sets stays in both (keep) or only in the named set (default keep)")
    group.add_argument("--n-score", type=int, default=50,
                       help="prompts for head scores, head means and task vectors (default 50)")


def _step_options(parser: argparse.ArgumentParser) -> None:
    """Options every heads step takes."""
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per forward pass (default 8)")


def register(subparsers) -> None:
    steps = StepCommand(subparsers, "heads", "score, ablate and sweep attention heads; inject task vectors",
                        DESCRIPTION, EXAMPLES, _step_options)

    score_parser = steps.add("score", "score every head (PTH, IH and classic detectors) into the store", run_score)
    score_parser.set_defaults(n=50)
    score_parser.add_argument("--top", type=int, default=5, help="heads listed per score in the output (default 5)")
    _score_arguments(score_parser)
    score_parser.add_argument("--overwrite-scores", action="store_true",
                              help="replace head scores saved with other settings")

    ablate_parser = steps.add("ablate", "extract states with a head set ablated", run_ablate)
    ablate_parser.add_argument("--set", required=True, help="ih, pth, random, or heads as BLOCK.HEAD,BLOCK.HEAD")
    ablate_parser.add_argument("--mode", default="zero", choices=["zero", "mean"], help="zero or mean ablation")
    ablate_parser.add_argument("--setting", default=None, help="group name (default ablate_<set>)")
    ablate_parser.add_argument("--overwrite", action="store_true", help="replace a group written with other settings")
    _selection_arguments(ablate_parser)
    add_cluster_arguments(ablate_parser)

    inject_parser = steps.add("inject", "extract zero-shot states with a task vector injected", run_inject)
    inject_parser.add_argument("--vector", required=True,
                               help="ih, pth, or heads as BLOCK.HEAD,... whose outputs make the vector")
    inject_parser.add_argument("--layer", type=int, default=None,
                               help="residual state index 0..L (default round(3L/8) for ih, 2 otherwise)")
    inject_parser.add_argument("--setting", default=None, help="group name (default inject_<vector>)")
    inject_parser.add_argument("--overwrite", action="store_true", help="replace a group written with other settings")
    _selection_arguments(inject_parser)
    add_cluster_arguments(inject_parser)

    sweep_parser = steps.add("sweep", "zero-ablate each head alone and measure the label logits", run_sweep,
                             store=False)
    sweep_parser.add_argument("--method", default="fast", choices=["fast", "naive"],
                              help="fast: re-run only the layers after each head (default); naive: one pass per head")
    sweep_parser.add_argument("--out", default=None, metavar="CSV", help="write the per-head table here")

    study_parser = steps.add("study", "run the whole heads study and summarise it", run_study)
    _selection_arguments(study_parser)
    study_parser.add_argument("--mode", default="zero", choices=["zero", "mean"], help="ablation mode (default zero)")
    study_parser.add_argument("--no-measures", action="store_true", help="skip the geometry measures")
    study_parser.add_argument("--n-boot", type=int, default=200,
                              help="bootstrap resamples of the measures (default 200)")
    study_parser.add_argument("--figures", default=None, metavar="DIR", help="write figures and CSV tables here")
    study_parser.add_argument("--quiet", action="store_true", help="no progress bars")
    add_cluster_arguments(study_parser)
