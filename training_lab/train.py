"""Batched training: all seeds of a config train at once as one :class:`LabTransformer` (SGD or Adam on the query's
cross-entropy, each run's loss a mean over its batch, the runs' losses summed so each run's gradient is its own).

Each run draws its world, its training batches and its held-out evaluation set from generators derived from its
seed (:func:`training_lab.model.run_generators`), so a run's numbers do not depend on which runs share the batch.
A run is resumable: checkpoints (weights and data generators' states) are written only right after an evaluation
has been stored, so a resumed run continues from the latest checkpoint, rewrites nothing before it and reproduces
the uninterrupted run bit for bit. A run re-started with a larger ``train.steps`` is extended the same way (its
store grows, :func:`training_lab.store.create`): it equals a run trained to the end directly at every step both
have. The old last step stays an evaluation and snapshot step; where the longer schedule lacks it, ``train_loss``
at the next evaluation averages the updates since it (not since the longer schedule's previous evaluation).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import xarray as xr
from torch.nn import functional as F
from tqdm.auto import tqdm

from training_lab import checkpoints, clamps, store
from training_lab.config import OPTIMIZERS, LabConfig, TrainConfig, log_steps
from training_lab.errors import NonFiniteLossError
from training_lab.model import LabTransformer, run_generators
from training_lab.tasks import Batch, make_world, sample, stack

STORE_NAME, CHECKPOINT_DIR = "run.zarr", "checkpoints"
#: Per read-out kind: the snapshots' variable of the values the read-out's rows act on, and its width dim.
READOUT_VARIABLES = {"mlp": ("readout_hidden", "unit"), "linear": ("readout_input", "dim")}


@dataclass(frozen=True)
class Schedule:
    """The steps (counted in SGD updates done) at which a run evaluates, snapshots and checkpoints."""

    evals: list[int]
    snapshots: list[int]
    checkpoints: frozenset[int]


def schedule(train: TrainConfig, ends: Iterable[int] = ()) -> Schedule:
    """Evaluations at 0, every ``eval_every``, log-spaced and at the end (snapshot steps included); checkpoints at
    the first evaluation at least ``checkpoint_every`` after the previous one, and at the end.

    ``ends``: the last steps of an extended run's shorter configs, kept as evaluation and snapshot steps. Below
    such a step a longer schedule holds the shorter one's steps (log-spaced steps depend only on the counts per
    decade, regular ones on ``eval_every``), so an extended run's steps are this schedule's plus its ``ends``."""
    snapshots = sorted(set(log_steps(train.steps, train.snapshots_per_decade)) | set(ends))
    regular = set(range(0, train.steps + 1, train.eval_every))
    evals = sorted(regular | set(log_steps(train.steps, train.evals_per_decade)) | set(snapshots))
    saved, last = {train.steps}, 0
    for step in evals:
        if step >= last + train.checkpoint_every:
            saved.add(step)
            last = step
    return Schedule(evals, snapshots, frozenset(saved))


def query_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-run mean cross-entropy (R,) of logits (R, B, L) against labels (R, B)."""
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(labels.shape).mean(dim=1)


def evaluation_sets(config: LabConfig, worlds: list) -> dict[str, Batch]:
    """The run's fixed held-out batches by evaluation set (``config.task.evaluation_sets``), each of
    ``eval_examples`` contexts per run, drawn in that order from each run's evaluation generator (so the ``train``
    set is the same with or without the others)."""
    generators = run_generators(config.train.seeds, 3)
    return {split: stack([sample(config.task, world, config.train.eval_examples, g, split)
                          for world, g in zip(worlds, generators)])
            for split in config.task.evaluation_sets}


class Trainer:
    """One batched run of ``config`` writing to the run directory ``out`` (see :func:`train`)."""

    def __init__(self, config: LabConfig, out: str | Path):
        self.config, self.out = config, Path(out)
        task, seeds = config.task, config.train.seeds
        self.model = LabTransformer(config.model, task, seeds)
        self.worlds = [make_world(task, g) for g in run_generators(seeds, 1)]
        self.generators = run_generators(seeds, 2)
        self.eval_sets = evaluation_sets(config, self.worlds)
        self.eval_set = self.eval_sets["train"]
        self.optimizer = OPTIMIZERS[config.train.optimizer](self.model.parameters(), lr=config.train.lr)
        self.schedule = schedule(config.train)
        self.store = self.out / STORE_NAME
        self.checkpoint_dir = self.out / CHECKPOINT_DIR
        self._patterns = [f"blocks.{b}.attn.pattern" for b in range(config.model.n_blocks)]

    def next_batch(self) -> Batch:
        size = self.config.train.batch_size
        return stack([sample(self.config.task, world, size, g) for world, g in zip(self.worlds, self.generators)])

    def run(self, *, progress: bool = True, on_step: Callable[[int], None] | None = None) -> xr.Dataset:
        """Train to ``config.train.steps`` (resuming from the latest checkpoint) and return the curves."""
        config = self.config.to_dict()
        self.schedule = schedule(self.config.train, self._ends(store.check_config(self.store, config)))
        store.create(self.store, config, self._empty_datasets())
        start = self._resume()
        evals, snapshots = ({s: i for i, s in enumerate(steps)}
                            for steps in (self.schedule.evals, self.schedule.snapshots))
        steps = self.config.train.steps
        running, since = torch.zeros(self.model.n_runs), 0
        bar = tqdm(total=steps, initial=start, disable=not progress, desc="training", unit="step")
        try:
            for step in range(start, steps + 1):
                if step in evals and not (step == start and start > 0):
                    train_loss = (running / since).numpy() if since else np.full(self.model.n_runs, np.nan)
                    loss, accuracy = self._evaluate(step, evals[step], snapshots.get(step), train_loss)
                    running, since = torch.zeros(self.model.n_runs), 0
                    bar.set_postfix(loss=f"{loss.mean():.3f}", acc=f"{accuracy.mean():.3f}")
                    if step in self.schedule.checkpoints:
                        checkpoints.save(self.checkpoint_dir, step, self.model.named_weights(),
                                         [g.get_state() for g in self.generators], self.optimizer, config,
                                         keep_old=self.config.train.keep_checkpoints)
                if step == steps:
                    break
                running += self._step(step)
                since += 1
                bar.update(1)
                if on_step is not None:
                    on_step(step + 1)
        finally:
            bar.close()
        return store.open_run(self.store)

    def _ends(self, stored: dict | None) -> list[int]:
        """The last steps of the run's earlier, shorter configs (``stored``: the store's config, None for a new
        run): its stored steps up to its last that this config's schedule lacks."""
        if stored is None:
            return []
        last, plain = stored["train"]["steps"], schedule(self.config.train)
        return sorted({int(s) for group, kept in (("curves", plain.evals), ("snapshots", plain.snapshots))
                       for s in store.steps(self.store, group) if s <= last and s not in kept})

    def _step(self, step: int) -> torch.Tensor:
        batch = self.next_batch()
        with clamps.applied(self.model, self.config.clamps, batch, self.config.task):
            logits = self.model(batch.tokens, query_only=not self.model.needs_all_positions())
        losses = query_losses(logits, batch.label)
        self._check_finite(losses, "training", step)
        self.optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()
        self.optimizer.step()
        return losses.detach()

    def _check_finite(self, losses: torch.Tensor, kind: str, step: int) -> None:
        finite = torch.isfinite(losses).tolist()
        if all(finite):
            return
        bad = [seed for seed, ok in zip(self.config.train.seeds, finite) if not ok]
        last = checkpoints.latest(self.checkpoint_dir)
        raise NonFiniteLossError(f"non-finite {kind} loss at step {step} (seed(s) {bad}); last good checkpoint: "
                                 f"{last or 'none'}; lower train.lr or change the config",
                                 step=step, checkpoint=str(last) if last else None)

    def _resume(self) -> int:
        latest = checkpoints.latest(self.checkpoint_dir)
        if latest is None:
            return 0
        saved = checkpoints.load(latest)
        checkpoints.restore_weights(self.model.named_weights(), saved)
        for generator, state in zip(self.generators, saved.rng_states):
            generator.set_state(state)
        checkpoints.restore_optimizer(self.optimizer, saved.optimizer)
        return saved.step

    @torch.no_grad()
    def _evaluate(self, step: int, index: int, snapshot: int | None, train_loss: np.ndarray):
        """Held-out loss, accuracy and mean attention patterns; at snapshot steps also the fixed examples' patterns,
        query states, the values the read-out's rows act on (:attr:`LabTransformer.readout_site`) and the rows."""
        states = self.model.state_names() if snapshot is not None else []
        site = self.model.readout_site
        readout = [site] if snapshot is not None else []
        with clamps.applied(self.model, self.config.clamps, self.eval_set, self.config.task), \
                self.model.hooks.cache(self._patterns + states + readout) as cache:
            logits = self.model(self.eval_set.tokens)
        labels = self.eval_set.label
        loss, accuracy = query_losses(logits, labels), (logits.argmax(-1) == labels).float().mean(dim=1)
        self._check_finite(loss, "evaluation", step)
        heldout = self._evaluate_heldout()
        patterns = torch.stack([cache[name] for name in self._patterns], dim=1)  # (R, block, B, H, S, S)
        store.write_step(self.store, "curves", index, {
            "loss": loss.numpy(), "accuracy": accuracy.numpy(), "train_loss": train_loss.astype(np.float32),
            "mean_pattern": patterns.mean(dim=2).numpy(), **heldout})
        if snapshot is not None:
            n = self.config.train.snapshot_examples
            hidden = torch.stack([cache[name][:, :n, -1] for name in states], dim=1)  # (R, layer, n, d)
            store.write_step(self.store, "snapshots", snapshot, {
                "pattern": patterns[:, :, :n].transpose(2, 3).numpy(),
                "hidden": hidden.numpy(),
                READOUT_VARIABLES[self.config.model.readout][0]: cache[site][:, :n].numpy(),
                "readout_rows": self.model.readout_rows().numpy()})
        return loss.numpy(), accuracy.numpy()

    def _evaluate_heldout(self) -> dict[str, np.ndarray]:
        """``heldout_loss`` and ``heldout_accuracy`` (seed, heldout) on the extra evaluation sets (none: {})."""
        results = []
        for split in self.config.task.evaluation_sets[1:]:
            batch = self.eval_sets[split]
            with clamps.applied(self.model, self.config.clamps, batch, self.config.task):
                logits = self.model(batch.tokens, query_only=not self.model.needs_all_positions())
            results.append((query_losses(logits, batch.label), (logits.argmax(-1) == batch.label).float().mean(1)))
        if not results:
            return {}
        return {name: torch.stack([r[k] for r in results], dim=1).numpy()
                for k, name in enumerate(("heldout_loss", "heldout_accuracy"))}

    def _empty_datasets(self) -> dict[str, xr.Dataset]:
        c, seeds = self.config, list(self.config.train.seeds)
        runs, blocks, heads, seq = len(seeds), c.model.n_blocks, c.model.n_heads, c.task.seq_len
        n = c.train.snapshot_examples
        readout_state, unit = READOUT_VARIABLES[c.model.readout]
        readout_width = c.model.width if c.model.readout == "linear" else c.model.readout_width
        evals, snaps = self.schedule.evals, self.schedule.snapshots

        def nan(*shape: int) -> np.ndarray:
            return np.full(shape, np.nan, dtype=np.float32)

        coords = {"seed": seeds, "block": range(blocks), "head": range(heads), "query": range(seq), "key": range(seq)}
        curves = xr.Dataset(
            {"loss": (("step", "seed"), nan(len(evals), runs)),
             "accuracy": (("step", "seed"), nan(len(evals), runs)),
             "train_loss": (("step", "seed"), nan(len(evals), runs)),
             "mean_pattern": (("step", "seed", "block", "head", "query", "key"),
                              nan(len(evals), runs, blocks, heads, seq, seq)),
             "done": (("step",), np.zeros(len(evals), dtype=bool))},
            coords={"step": evals, **coords})
        heldout = c.task.evaluation_sets[1:]
        if heldout:
            for name in ("heldout_loss", "heldout_accuracy"):
                curves[name] = (("step", "seed", "heldout"), nan(len(evals), runs, len(heldout)))
            curves = curves.assign_coords(heldout=np.array(heldout, dtype=object))  # variable-length strings
        eval_set = {name: (("seed", "example"), getattr(self.eval_set, name)[:, :n].numpy())
                    for name in ("label", "query_class", "task", "query_in_context")}
        eval_set["context_class"] = (("seed", "example", "pair"), self.eval_set.context_classes[:, :n].numpy())
        snapshots = xr.Dataset(
            {"pattern": (("step", "seed", "block", "head", "example", "query", "key"),
                         nan(len(snaps), runs, blocks, heads, n, seq, seq)),
             "hidden": (("step", "seed", "layer", "example", "dim"),
                        nan(len(snaps), runs, blocks + 1, n, c.model.width)),
             readout_state: (("step", "seed", "example", unit), nan(len(snaps), runs, n, readout_width)),
             "readout_rows": (("step", "seed", "class", unit), nan(len(snaps), runs, c.task.n_labels,
                                                                   readout_width)),
             "done": (("step",), np.zeros(len(snaps), dtype=bool)), **eval_set},
            coords={"step": snaps, "layer": range(blocks + 1), "example": range(n), "class": range(c.task.n_labels),
                    **coords})
        for dataset in (curves, snapshots):
            for name, variable in dataset.data_vars.items():
                if "step" in variable.dims:
                    variable.encoding["chunks"] = (1,) + variable.shape[1:]
        return {"curves": curves, "snapshots": snapshots}


def train(config: LabConfig, out: str | Path, *, progress: bool = True,
          on_step: Callable[[int], None] | None = None) -> xr.Dataset:
    """Train ``config`` (all its seeds at once) into the run directory ``out`` (``run.zarr`` + ``checkpoints/``),
    resuming if ``out`` holds a run of the same config, extending it if ``out`` holds the same config with fewer
    ``train.steps``; returns the curves (``open_run(out)``). ``on_step(step)``
    is called after every update (``step`` updates done)."""
    return Trainer(config, out).run(progress=progress, on_step=on_step)
