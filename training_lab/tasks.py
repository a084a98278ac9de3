"""[M]'s synthetic in-context meta-learning task, generated in whole batches by torch (no per-sample Python).

A *world* (drawn once per run from its seed) holds K class means mu_k ~ N(0, I/D), L label vectors ~ N(0, I/D) and
a base label per class. Task t maps class k to label (base_label[k] + t) mod L, as in the authors' code. A context
is N (item, label) pairs of N distinct classes under one task drawn uniformly from the T tasks, followed by a query
item whose class is drawn from all K classes (or, with ``query_in_context``, from the context's classes: with T = 1
that is the plain induction copy task). An item of class k is (mu_k + epsilon * eta) / sqrt(1 + epsilon^2) with
eta ~ N(0, I/D), drawn afresh for every item. With ``relabel`` (and ``query_in_context``) the context's labels are
instead N distinct labels drawn per sequence and the query takes the label of its class in the context: [S]'s task
(N = 2: exemplar, label, exemplar, label, query), with Gaussian class exemplars in place of [S]'s Omniglot features.

Exemplars and held-out sets ([S]'s evaluation, see :class:`~training_lab.config.TaskConfig`): with
``n_exemplars`` >= 1 the world also holds fixed exemplars per class, and an item is an exemplar of its class plus
the within-class noise, (x + epsilon * eta) / sqrt(1 + epsilon^2). :func:`sample` draws the training set's
sequences (training classes, their first ``n_exemplars`` exemplars) or, by ``split``, those of the held-out
exemplars (the training classes' other exemplars) or the held-out classes (their exemplars); each item picks its
exemplar uniformly from the split's. Everything drawn for these comes after [M]'s draws, so a task without them
draws exactly as before.

Tokens (our choice, stated because the paper leaves it open): a token is its content vector (the item, or the
label's D-dim vector) followed by a one-hot code of its position 0..2N in ``position_dims`` slots, so a token is
D + P wide (63 + 65 = 128 = the model width in [M]'s setting, fed in without an embedding matrix). Positions are
items 0, 2, .., 2N-2, labels 1, 3, .., 2N-1 and the query 2N.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from training_lab.config import TaskConfig
from training_lab.errors import LabError


@dataclass(frozen=True)
class World:
    """The fixed random quantities of one run's task: class means (K, D), label vectors (L, D), base labels (K,);
    the held-out classes' means (K_h, D) and, with exemplars, every class's exemplars (K + K_h, n_exemplars +
    heldout_exemplars, D) (training classes first)."""

    means: torch.Tensor
    label_vectors: torch.Tensor
    base_label: torch.Tensor
    heldout_means: torch.Tensor | None = None
    exemplars: torch.Tensor | None = None


@dataclass(frozen=True)
class Batch:
    """A batch of contexts; with several runs stacked every field gains a leading run dimension.

    ``tokens`` (B, 2N+1, D+P) float; ``label`` (B,) the query's label; ``query_class`` (B,); ``task`` (B,);
    ``context_classes`` (B, N); ``query_in_context`` (B,) bool; ``context_labels`` (B, N) the context's labels."""

    tokens: torch.Tensor
    label: torch.Tensor
    query_class: torch.Tensor
    task: torch.Tensor
    context_classes: torch.Tensor
    query_in_context: torch.Tensor
    context_labels: torch.Tensor


def make_world(task: TaskConfig, generator: torch.Generator) -> World:
    """Draw one run's class means, label vectors and base labels from ``generator``."""
    scale = 1.0 / math.sqrt(task.item_dims)
    means = torch.randn(task.n_classes, task.item_dims, generator=generator) * scale
    label_vectors = torch.randn(task.n_labels, task.item_dims, generator=generator) * scale
    base_label = torch.randint(task.n_labels, (task.n_classes,), generator=generator)
    heldout_means = torch.randn(task.heldout_classes, task.item_dims, generator=generator) * scale
    exemplars = None
    if task.n_exemplars:
        centres = torch.cat([means, heldout_means])
        spread = torch.randn(len(centres), task.n_exemplars + task.heldout_exemplars, task.item_dims,
                             generator=generator) * scale
        exemplars = (centres.unsqueeze(1) + task.exemplar_spread * spread) / math.sqrt(1.0 + task.exemplar_spread**2)
    return World(means, label_vectors, base_label, heldout_means, exemplars)


def _split_classes(task: TaskConfig, split: str) -> tuple[int, int, int, int]:
    """(first class, number of classes, first exemplar, number of exemplars) that ``split``'s items come from."""
    if split == "train":
        return 0, task.n_classes, 0, task.n_exemplars
    if split == "heldout_exemplars" and task.heldout_exemplars:
        return 0, task.n_classes, task.n_exemplars, task.heldout_exemplars
    if split == "heldout_classes" and task.heldout_classes:
        return task.n_classes, task.heldout_classes, 0, task.n_exemplars
    raise LabError(f"unknown or unconfigured evaluation set {split!r}; this task has: "
                   f"{', '.join(task.evaluation_sets)}")


def label_maps(task: TaskConfig, world: World) -> torch.Tensor:
    """(T, K) label of every class under every task: (base_label[k] + t) mod L."""
    shifts = torch.arange(task.n_tasks).unsqueeze(1)
    return (world.base_label.unsqueeze(0) + shifts) % task.n_labels


def sample(task: TaskConfig, world: World, batch_size: int, generator: torch.Generator,
           split: str = "train") -> Batch:
    """Draw ``batch_size`` contexts with their queries from the evaluation set ``split`` (one of
    ``task.evaluation_sets``; ``train``: the training distribution); every random draw is one tensor call.
    Held-out classes are numbered after the training classes (K, K + 1, ...)."""
    n, d = task.n_pairs, task.item_dims
    first_class, n_classes, first_exemplar, n_exemplars = _split_classes(task, split)
    # the N largest of K uniform draws: a uniformly random ordered subset (topk is far cheaper than a full sort)
    context = torch.rand(batch_size, n_classes, generator=generator).topk(n, dim=1).indices + first_class
    task_id = torch.randint(task.n_tasks, (batch_size,), generator=generator)
    if task.query_in_context:
        slot = torch.randint(n, (batch_size, 1), generator=generator)
        query_class = context.gather(1, slot).squeeze(1)
    else:
        query_class = torch.randint(task.n_classes, (batch_size,), generator=generator)
    classes = torch.cat([context, query_class.unsqueeze(1)], dim=1)  # (B, N+1)
    noise = torch.randn(batch_size, n + 1, d, generator=generator) / math.sqrt(d)
    if task.relabel:  # distinct labels drawn per sequence; the query takes its class's label
        drawn = torch.rand(batch_size, task.n_labels, generator=generator).topk(n, dim=1).indices
        labels = torch.cat([drawn, drawn.gather(1, slot)], dim=1)
    else:
        labels = label_maps(task, world)[task_id.unsqueeze(1), classes]  # (B, N+1)
    if world.exemplars is None:
        centres = (world.means if first_class == 0 else torch.cat([world.means, world.heldout_means]))[classes]
    else:
        chosen = first_exemplar + torch.randint(n_exemplars, classes.shape, generator=generator)
        centres = world.exemplars[classes, chosen]
    items = (centres + task.epsilon * noise) / math.sqrt(1.0 + task.epsilon**2)
    tokens = torch.zeros(batch_size, task.seq_len, task.token_dims)
    tokens[:, 0::2, :d] = items
    tokens[:, 1::2, :d] = world.label_vectors[labels[:, :n]]
    positions = torch.arange(task.seq_len)
    tokens[:, positions, d + positions] = 1.0
    present = (context == query_class.unsqueeze(1)).any(dim=1)
    return Batch(tokens, labels[:, n], query_class, task_id, context, present, labels[:, :n])


def stack(batches: list[Batch]) -> Batch:
    """Stack per-run batches along a new leading run dimension."""
    return Batch(**{f.name: torch.stack([getattr(b, f.name) for b in batches]) for f in fields(Batch)})
