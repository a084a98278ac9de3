"""Per-head output statistics over reference prompts: mean outputs for mean ablation, and task vectors ([Y]).

A head's *output* is its slice of the output projection's input (``head_dim`` wide). Pushed through the output
projection alone, ``o_h = proj(x with only the slice nonzero) - proj(0)`` (the projection without its bias, for any
weight layout: ``nn.Linear`` or GPT-2's ``Conv1D``), it is the head's part of the attention output ``A = sum_h o_h
(+ bias)``.

What a head *writes into the residual stream* is ``o_h`` itself when ``A`` is added to the residual directly (Llama,
GPT-2, Gemma 1). Gemma 2 and 3 first pass ``A`` through a post-attention RMS norm ``N(A) = g * A / rms(A)``; then the
head's write is its exact share ``g * o_h / rms(A)`` (the shares of all heads and the bias sum to ``N(A)``), computed
as ``N(k o_h) / k`` with ``k = rms(A) / rms(o_h)`` so neither ``g`` nor the norm's epsilon need to be known. That
norm is found from the model (the layer child that receives the attention output), not from its name, and the
decomposition is checked against ``N(A)`` on the first batch.

The IH (or PTH) task vector is, for each head of the set, the mean of its residual write at the final position over
the reference prompts (``shots``-shot, the first ``n`` queries of ``seed``), summed over the heads: one vector of the
model's hidden size, added to zero-shot prompts by :func:`heads.inject`. ``post_norm=False`` gives the plain ``o_h``
mean instead.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from extraction.architecture import Architecture
from extraction.capture import forward_last
from extraction.models import LoadedModel
from extraction.tasks import Task
from heads.errors import HeadsError
from heads.interventions import check_heads
from heads.prompting import prompt_batches
from heads.selection import Head

SHARE_TOLERANCE = 1e-3
#: How task vectors are built, recorded with injection groups.
VECTOR_SPACE = "residual write: o_proj output of each head, times its share of a post-attention RMS norm if any"


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
def head_means(loaded: LoadedModel, *, task: str | Task = "sentiment", shots: int = 8, n: int = 50, seed: int = 0,
               batch_size: int = 8, progress: bool = True, **prompt_options: Any) -> torch.Tensor:
    """Every head's mean output over all real token positions of the reference prompts, (n_layers, n_heads, head_dim):
    the replacement values of ``heads.ablate(..., mode="mean", means=...)``."""
    arch = loaded.arch
    reference = prompt_batches(loaded, task=task, shots=shots, n=n, seed=seed, batch_size=batch_size, **prompt_options)
    sums, count = _WeightedInputSums(arch), 0.0
    with sums.hooked():
        for _, encoded in tqdm(reference.batches, desc="head means", unit="batch", disable=not progress):
            sums.weights = encoded.attention_mask.float()
            count += float(sums.weights.sum())
            forward_last(loaded.model, encoded.input_ids.to(loaded.device), encoded.attention_mask.to(loaded.device))
    return (sums.totals / count).float().view(arch.n_layers, arch.n_heads, arch.head_dim)


@torch.no_grad()
def attention_output_norms(loaded: LoadedModel) -> tuple[nn.Module | None, ...]:
    """Per layer, the child module the attention output passes through before the residual add, or None.

    Found with one short forward pass: the child of the decoder layer whose input is the attention module's output
    tensor itself (Gemma 2/3's post-attention norm); a norm applied to the residual sum (Llama's
    ``post_attention_layernorm``, GPT-2's ``ln_2``) does not receive that tensor and is not picked, and neither is
    a child that returns its input unchanged (GPT-NeoX's and Phi-3's attention dropout in eval mode).
    """
    arch = loaded.arch
    outputs: dict[int, torch.Tensor] = {}
    found: dict[int, nn.Module] = {}

    def keep(layer: int):
        def hook(module, args, output):
            outputs[layer] = output[0] if isinstance(output, tuple) else output
        return hook

    def check(layer: int, child: nn.Module):
        def hook(module, args, output):
            received = args[0] if args else None
            changed = output is not received and not (torch.is_tensor(output) and torch.equal(output, received))
            if received is not None and received is outputs.get(layer) and changed:
                found[layer] = child
        return hook

    handles = [attention.register_forward_hook(keep(l)) for l, attention in enumerate(arch.attentions)]
    for layer, block in enumerate(arch.layers):
        handles += [child.register_forward_hook(check(layer, child))
                    for child in block.children() if child is not arch.attentions[layer]]
    try:
        encoded = loaded.tokenizer(["The answer is"], return_tensors="pt")
        forward_last(loaded.model, encoded["input_ids"].to(loaded.device), encoded["attention_mask"].to(loaded.device))
    finally:
        for handle in handles:
            handle.remove()
    return tuple(found.get(layer) for layer in range(arch.n_layers))


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x.float().pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-12)


@torch.no_grad()
def residual_writes(projection: nn.Module, head_dim: int, heads: Sequence[int], inputs: torch.Tensor,
                    attention_output: torch.Tensor, norm: nn.Module | None) -> torch.Tensor:
    """What each of ``heads`` writes into the residual stream, (len(heads), rows, hidden), from the output
    ``projection``'s ``inputs`` (rows, n_heads * head_dim) and output (rows, hidden) at the same positions."""
    rows, width = inputs.shape
    x = inputs.new_zeros(len(heads) + 1, rows, width)
    for i, head in enumerate(heads):
        span = slice(head * head_dim, (head + 1) * head_dim)
        x[i, :, span] = inputs[:, span]
    projected = projection(x)
    return norm_share(norm, projected[:-1] - projected[-1:], attention_output)  # last slot: the bias alone


def norm_share(norm: nn.Module | None, part: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """The share of ``part`` (..., rows, hidden) in ``norm(whole)`` for an RMS norm: ``N(k part) / k`` with
    ``k = rms(whole) / rms(part)`` (= ``g * part / rms(whole)``); ``part`` itself when there is no norm."""
    if norm is None:
        return part.float()
    scale = _rms(whole) / _rms(part)
    return norm((part * scale).to(whole.dtype)).float() / scale


class _LastPosition:
    """Records, for some layers, the output projection's input and output at the last position of each row."""

    def __init__(self, arch: Architecture, layers: Sequence[int]):
        self.arch, self.layers = arch, list(layers)
        self.inputs: dict[int, torch.Tensor] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    @contextmanager
    def hooked(self) -> Iterator["_LastPosition"]:
        def keep(layer: int):
            def hook(module, args, output):
                self.inputs[layer], self.outputs[layer] = args[0][:, -1], output[:, -1]
            return hook

        handles = [self.arch.output_projections[l].register_forward_hook(keep(l)) for l in self.layers]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()


def _check_shares(arch: Architecture, layer: int, record: _LastPosition, norm: nn.Module) -> None:
    """The shares of all heads (and of the projection's bias) must add up to the norm of the attention output.

    Checked in float32 on copies of the projection and the norm, so a bfloat16 model's rounding is not mistaken for a
    norm that is not an RMS norm.
    """
    projection, norm = copy.deepcopy(arch.output_projections[layer]).float(), copy.deepcopy(norm).float()
    inputs = record.inputs[layer].float()
    output = projection(inputs)
    shares = residual_writes(projection, arch.head_dim, range(arch.n_heads), inputs, output, norm).sum(0)
    bias = projection(inputs.new_zeros(1, inputs.shape[-1])).expand_as(output)
    if bias.abs().max() > 0:
        shares = shares + norm_share(norm, bias, output)
    expected = norm(output).float()
    error = (shares - expected).abs().max().item() / (expected.abs().max().item() + 1e-12)
    if error > SHARE_TOLERANCE:
        raise HeadsError(f"the post-attention norm of layer {layer} is not an RMS norm (head shares miss its output "
                         f"by {error:.1e}); use post_norm=False for projection-space task vectors")


@torch.no_grad()
def task_vector(loaded: LoadedModel, heads: Sequence[Head], *, task: str | Task = "sentiment", shots: int = 8,
                n: int = 50, seed: int = 0, batch_size: int = 8, post_norm: bool = True, progress: bool = True,
                **prompt_options: Any) -> torch.Tensor:
    """Sum over ``heads`` of each head's mean residual write at the final position of the reference prompts, (hidden,).

    See the module docstring; ``post_norm=False`` skips the post-attention norm share (projection space).
    """
    arch = loaded.arch
    heads = check_heads(arch, heads)
    reference = prompt_batches(loaded, task=task, shots=shots, n=n, seed=seed, batch_size=batch_size, **prompt_options)
    norms = attention_output_norms(loaded) if post_norm else (None,) * arch.n_layers
    by_layer = {layer: [h for l, h in heads if l == layer] for layer in sorted({l for l, _ in heads})}
    total, count = torch.zeros(arch.hidden_size, dtype=torch.float64), 0
    record = _LastPosition(arch, by_layer)
    batches = tqdm(reference.batches, desc="task vector", unit="batch", disable=not progress)
    for step, (_, encoded) in enumerate(batches):
        with record.hooked():  # off again before the projections are re-used below
            forward_last(loaded.model, encoded.input_ids.to(loaded.device), encoded.attention_mask.to(loaded.device))
        for layer, layer_heads in by_layer.items():
            if step == 0 and norms[layer] is not None:
                _check_shares(arch, layer, record, norms[layer])
            writes = residual_writes(arch.output_projections[layer], arch.head_dim, layer_heads,
                                     record.inputs[layer], record.outputs[layer], norms[layer])
            total += writes.sum(dim=(0, 1)).double().cpu()
        count += len(encoded.input_ids)
    return (total / count).float()
