"""Per-head output statistics over reference prompts: mean outputs for mean ablation, and task vectors ([Y]).

A head's output is its slice of the output projection's input (``head_dim`` wide). Its contribution to the residual
stream is that slice pushed through the output projection alone: ``proj(x with only the slice nonzero) - proj(0)``,
i.e. the projection without its bias, which works for any weight layout (``nn.Linear`` or GPT-2's ``Conv1D``).

The IH (or PTH) task vector is, for each head of the set, the mean of its contribution at the final position over the
reference prompts (``shots``-shot, the first ``n`` queries of ``seed``), summed over the heads: one residual-stream
vector of the model's hidden size, added to zero-shot prompts by :func:`heads.inject`.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from extraction.architecture import Architecture
from extraction.capture import forward_last
from extraction.models import LoadedModel
from extraction.tasks import Task
from heads.interventions import check_heads
from heads.prompting import PromptBatches, prompt_batches
from heads.selection import Head


class _WeightedInputSums:
    """Adds each layer's output-projection input, weighted over (batch, position) by ``weights``, into ``totals``."""

    def __init__(self, arch: Architecture):
        self.arch = arch
        self.totals = torch.zeros(arch.n_layers, arch.n_heads * arch.head_dim, dtype=torch.float64)
        self.weights: torch.Tensor | None = None

    def _hook(self, layer: int):
        def add(module, args):
            x = args[0]
            self.totals[layer] += torch.einsum("bt,btd->d", self.weights.to(x), x).double().cpu()
        return add

    @contextmanager
    def hooked(self) -> Iterator["_WeightedInputSums"]:
        handles = [p.register_forward_pre_hook(self._hook(l)) for l, p in enumerate(self.arch.output_projections)]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()


@torch.no_grad()
def mean_projection_inputs(loaded: LoadedModel, reference: PromptBatches, *, last_only: bool,
                           progress: bool = True) -> torch.Tensor:
    """Mean of every head's output over the reference prompts: at the final position only (``last_only``) or over
    every real token. Returns (n_layers, n_heads, head_dim), float32."""
    arch = loaded.arch
    sums, count = _WeightedInputSums(arch), 0.0
    with sums.hooked():
        for _, encoded in tqdm(reference.batches, desc="head outputs", unit="batch", disable=not progress):
            weights = encoded.attention_mask.float()
            if last_only:
                weights = torch.zeros_like(weights)
                weights[:, -1] = 1.0
            sums.weights, count = weights, count + float(weights.sum())
            forward_last(loaded.model, encoded.input_ids.to(loaded.device), encoded.attention_mask.to(loaded.device))
    return (sums.totals / count).float().view(arch.n_layers, arch.n_heads, arch.head_dim)


def head_means(loaded: LoadedModel, *, task: str | Task = "sentiment", shots: int = 8, n: int = 50, seed: int = 0,
               batch_size: int = 8, progress: bool = True, **prompt_options: Any) -> torch.Tensor:
    """Every head's mean output over all real token positions of the reference prompts, (n_layers, n_heads, head_dim):
    the replacement values of ``heads.ablate(..., mode="mean", means=...)``."""
    reference = prompt_batches(loaded, task=task, shots=shots, n=n, seed=seed, batch_size=batch_size, **prompt_options)
    return mean_projection_inputs(loaded, reference, last_only=False, progress=progress)


@torch.no_grad()
def head_contribution(arch: Architecture, layer: int, head: int, output: torch.Tensor) -> torch.Tensor:
    """Residual-stream contribution (hidden,) of a head output (head_dim,): its slice alone through the projection."""
    projection = arch.output_projections[layer]
    weight = next(projection.parameters())
    x = torch.zeros(2, arch.n_heads * arch.head_dim, dtype=weight.dtype, device=weight.device)
    x[0, head * arch.head_dim:(head + 1) * arch.head_dim] = output.to(weight)
    projected = projection(x).float()
    return (projected[0] - projected[1]).cpu()


def task_vector(loaded: LoadedModel, heads: Sequence[Head], *, task: str | Task = "sentiment", shots: int = 8,
                n: int = 50, seed: int = 0, batch_size: int = 8, progress: bool = True,
                **prompt_options: Any) -> torch.Tensor:
    """Sum over ``heads`` of each head's mean contribution at the final position of the reference prompts, (hidden,)."""
    heads = check_heads(loaded.arch, heads)
    reference = prompt_batches(loaded, task=task, shots=shots, n=n, seed=seed, batch_size=batch_size, **prompt_options)
    means = mean_projection_inputs(loaded, reference, last_only=True, progress=progress)
    return torch.stack([head_contribution(loaded.arch, l, h, means[l, h]) for l, h in heads]).sum(0)
