"""[M]'s synthetic in-context meta-learning task, generated in whole batches by torch (no per-sample Python).

A *world* (drawn once per run from its seed) holds K class means mu_k ~ N(0, I/D), L label vectors ~ N(0, I/D) and
a base label per class. Task t maps class k to label (base_label[k] + t) mod L, as in the authors' code. A context
is N (item, label) pairs of N distinct classes under one task drawn uniformly from the T tasks, followed by a query
item whose class is drawn from all K classes (or, with ``query_in_context``, from the context's classes: with T = 1
that is the plain induction copy task). An item of class k is (mu_k + epsilon * eta) / sqrt(1 + epsilon^2) with
eta ~ N(0, I/D), drawn afresh for every item. With ``relabel`` (and ``query_in_context``) the context's labels are
instead N distinct labels drawn per sequence and the query takes the label of its class in the context: [S]'s task
(N = 2: exemplar, label, exemplar, label, query), with Gaussian class exemplars in place of [S]'s Omniglot features.

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


@dataclass(frozen=True)
class World:
    """The fixed random quantities of one run's task: class means (K, D), label vectors (L, D), base labels (K,)."""

    means: torch.Tensor
    label_vectors: torch.Tensor
    base_label: torch.Tensor


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
    return World(means, label_vectors, base_label)


def label_maps(task: TaskConfig, world: World) -> torch.Tensor:
    """(T, K) label of every class under every task: (base_label[k] + t) mod L."""
    shifts = torch.arange(task.n_tasks).unsqueeze(1)
    return (world.base_label.unsqueeze(0) + shifts) % task.n_labels


def sample(task: TaskConfig, world: World, batch_size: int, generator: torch.Generator) -> Batch:
    """Draw ``batch_size`` contexts with their queries; every random draw is one tensor call."""
    n, d = task.n_pairs, task.item_dims
    # the N largest of K uniform draws: a uniformly random ordered subset (topk is far cheaper than a full sort)
    context = torch.rand(batch_size, task.n_classes, generator=generator).topk(n, dim=1).indices
    task_id = torch.randint(task.n_tasks, (batch_size,), generator=generator)
    if task.query_in_context:
        slot = torch.randint(n, (batch_size, 1), generator=generator)
        query_class = context.gather(1, slot).squeeze(1)
    else:
        query_class = torch.randint(task.n_classes, (batch_size,), generator=generator)
    classes = torch.cat([context, query_class.unsqueeze(1)], dim=1)  # (B, N+1)
    noise = torch.randn(batch_size, n + 1, d, generator=generator) / math.sqrt(d)
    items = (world.means[classes] + task.epsilon * noise) / math.sqrt(1.0 + task.epsilon**2)
    labels = label_maps(task, world)[task_id.unsqueeze(1), classes]  # (B, N+1)
    if task.relabel:  # distinct labels drawn per sequence; the query takes its class's label
        drawn = torch.rand(batch_size, task.n_labels, generator=generator).topk(n, dim=1).indices
        labels = torch.cat([drawn, drawn.gather(1, slot)], dim=1)
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
