"""Per-head ablation at any checkpoint of a lab run: which heads matter, and whether they are redundant ([S]'s
"induction heads are several, additive and redundant").

For a run directory and a checkpoint step, :func:`ablate_heads` rebuilds the run's model and fixed evaluation
sets (the same worlds and held-out batches the trainer used), loads the checkpoint's weights and evaluates every
evaluation set with nothing ablated, with each head ablated alone and with sets of heads ablated jointly (by
default: all heads of each block). A head is ablated by overwriting its output (hook point
``blocks.<b>.attn.head_out``, its contribution to the residual stream) at every position with zero or with its
mean over the evaluation batch (per run and position), through the clamp machinery
(:class:`~training_lab.clamps.ClampSpec` on ``attn.head_out``); the run's own clamps stay applied first, as in
its evaluations.

Reading the table: a head matters when its single ablation raises the loss (``delta_loss`` > 0). For a joint set,
``sum_single_delta`` is the sum of its heads' single deltas: a joint delta near it means additive heads, one far
above it means redundant heads (each alone can stand in for the others, so only removing them together hurts).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from training_lab import checkpoints, clamps
from training_lab.clamps import ClampSpec
from training_lab.config import LabConfig
from training_lab.errors import LabError
from training_lab.store import open_run
from training_lab.train import CHECKPOINT_DIR, Trainer, query_losses

#: A head as (block, head).
Head = tuple[int, int]
#: How an ablated head's output is replaced.
ABLATIONS = ("zero", "mean")
COLUMNS = ["step", "seed", "evaluation", "ablated", "kind", "n_heads", "loss", "accuracy", "delta_loss",
           "delta_accuracy", "sum_single_delta"]


def head_name(head: Head) -> str:
    return f"{head[0]}.{head[1]}"


def default_sets(n_blocks: int, n_heads: int) -> list[tuple[Head, ...]]:
    """Every head alone, then all heads of each block jointly."""
    singles = [((b, h),) for b in range(n_blocks) for h in range(n_heads)]
    return singles + [tuple((b, h) for h in range(n_heads)) for b in range(n_blocks)]


def _check_sets(sets: Sequence[Sequence[Head]], n_blocks: int, n_heads: int) -> list[tuple[Head, ...]]:
    checked = []
    for heads in sets:
        heads = tuple((int(b), int(h)) for b, h in heads)
        bad = [head_name(x) for x in heads if not (0 <= x[0] < n_blocks and 0 <= x[1] < n_heads)]
        if not heads or bad or len(set(heads)) != len(heads):
            raise LabError(f"a head set must name distinct heads (block, head) within {n_blocks} blocks of "
                           f"{n_heads} heads; got {[head_name(x) for x in heads] or 'an empty set'}")
        checked.append(heads)
    return checked


def _checkpoint(out: Path, step: int | None) -> Path:
    directory = out / CHECKPOINT_DIR
    steps = checkpoints.saved_steps(directory)
    if not steps:
        raise LabError(f"the run at {out} has no checkpoint yet; train it first")
    if step is None:
        step = steps[-1]
    if step not in steps:
        raise LabError(f"the run at {out} has no checkpoint at step {step}; saved steps: "
                       f"{', '.join(map(str, steps))} (set train.keep_checkpoints = true to keep every one)")
    return checkpoints.checkpoint_path(directory, step)


@torch.no_grad()
def ablate_heads(out: str | Path, step: int | None = None, sets: Sequence[Sequence[Head]] | None = None, *,
                 ablation: str = "zero") -> pd.DataFrame:
    """Loss and accuracy of the run in ``out`` at checkpoint ``step`` (None: the latest) with nothing, each head
    alone and each set in ``sets`` ablated (None: :func:`default_sets`), on every evaluation set, one row per
    (seed, evaluation, ablated set): the columns :data:`COLUMNS`. ``ablated`` names the heads ``block.head`` joined
    by ``+`` (``none``: the intact model); ``kind`` is ``none``, ``single`` or ``joint``."""
    if ablation not in ABLATIONS:
        raise LabError(f"ablation must be one of {', '.join(ABLATIONS)}, got {ablation!r}")
    out = Path(out)
    config = LabConfig.from_dict(open_run(out).attrs["config"])
    n_blocks, n_heads = config.model.n_blocks, config.model.n_heads
    joint = _check_sets(default_sets(n_blocks, n_heads)[n_blocks * n_heads:] if sets is None else sets,
                        n_blocks, n_heads)
    singles = [((b, h),) for b in range(n_blocks) for h in range(n_heads)]
    chosen = [()] + singles + [heads for heads in joint if len(heads) > 1]
    path = _checkpoint(out, step)
    saved = checkpoints.load(path)
    trainer = Trainer(config, out)
    checkpoints.restore_weights(trainer.model.named_weights(), saved)
    rows = []
    for evaluation, batch in trainer.eval_sets.items():
        for heads in chosen:
            loss, accuracy = _evaluate(trainer, config, batch, heads, ablation)
            for s, seed in enumerate(config.train.seeds):
                rows.append({"step": saved.step, "seed": seed, "evaluation": evaluation,
                             "ablated": "+".join(map(head_name, heads)) or "none",
                             "kind": "none" if not heads else "single" if len(heads) == 1 else "joint",
                             "n_heads": len(heads), "loss": float(loss[s]), "accuracy": float(accuracy[s])})
    return _with_deltas(pd.DataFrame(rows))


def _evaluate(trainer: Trainer, config: LabConfig, batch, heads: tuple[Head, ...],
              ablation: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-run loss and accuracy on ``batch`` with ``heads`` ablated (after the run's own clamps)."""
    specs = [ClampSpec("attn.head_out", ablation, blocks=(block,), heads=tuple(h for b, h in heads if b == block))
             for block in sorted({b for b, _ in heads})]
    with clamps.applied(trainer.model, [*config.clamps, *specs], batch, config.task):
        logits = trainer.model(batch.tokens)
    return (query_losses(logits, batch.label).numpy(),
            (logits.argmax(-1) == batch.label).float().mean(dim=1).numpy())


def _with_deltas(frame: pd.DataFrame) -> pd.DataFrame:
    """Add the change from the intact model and, for joint sets, the sum of their heads' single changes."""
    keys = ["step", "seed", "evaluation"]
    intact = frame[frame["kind"] == "none"].set_index(keys)[["loss", "accuracy"]]
    base = intact.reindex(pd.MultiIndex.from_frame(frame[keys]))
    frame["delta_loss"] = frame["loss"].to_numpy() - base["loss"].to_numpy()
    frame["delta_accuracy"] = frame["accuracy"].to_numpy() - base["accuracy"].to_numpy()
    single = frame[frame["kind"] == "single"].set_index(keys + ["ablated"])["delta_loss"]
    sums = []
    for row in frame.itertuples():
        if row.kind != "joint":
            sums.append(np.nan)
            continue
        sums.append(sum(single[(row.step, row.seed, row.evaluation, name)] for name in row.ablated.split("+")))
    frame["sum_single_delta"] = sums
    return frame[COLUMNS]


def _set_name(ablated: str) -> str:
    """``block b's n heads`` for a set of heads of one block of more than three, the ``+``-joined names otherwise."""
    heads = ablated.split("+")
    blocks = {name.split(".")[0] for name in heads}
    return f"block {blocks.pop()}'s {len(heads)} heads" if len(heads) > 3 and len(blocks) == 1 else ablated


def summary(frame: pd.DataFrame, evaluation: str = "train", top: int = 3) -> list[str]:
    """One line per seed: the heads whose single ablation raises the loss most, and each joint set's change
    against the sum of its heads' single changes."""
    lines = []
    for (step, seed), rows in frame[frame["evaluation"] == evaluation].groupby(["step", "seed"]):
        intact = rows[rows["kind"] == "none"].iloc[0]
        singles = rows[rows["kind"] == "single"].nlargest(top, "delta_loss")
        worst = ", ".join(f"{r.ablated} ({r.delta_loss:+.3f})" for r in singles.itertuples())
        joint = "; ".join(f"{_set_name(r.ablated)} jointly {r.delta_loss:+.3f} vs singles' sum "
                          f"{r.sum_single_delta:+.3f}" for r in rows[rows["kind"] == "joint"].itertuples())
        lines.append(f"step {step}, seed {seed}, {evaluation} set: loss {intact.loss:.3f}, accuracy "
                     f"{intact.accuracy:.3f}; largest single-head effects: {worst}" + (f"; {joint}" if joint else ""))
    return lines
