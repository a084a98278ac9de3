"""The whole-vocabulary logit lens of the query states: top-1 token and label-word logits at every layer.

Both come from the model's one read-out (:class:`extraction.readout.Readout`): the label logits are the read-out's
values (output scaling and soft-capping included); the top-1 token is taken on the LM head's raw output, which has
the same order (the post-processing is strictly increasing) and, unlike soft-capped float32 values, no ties where
``tanh`` saturates.

With a large vocabulary (Gemma 3: 262,144 rows) the lens costs about as much as the forward pass itself. For float32
(or float64) models it therefore runs a **certified shortlist**: a bfloat16 pass over the whole vocabulary picks
``SHORTLIST`` candidates per row, their logits are recomputed exactly, and the exact best candidate is accepted only
when it beats every other token's bfloat16 logit by more than a rigorous bound on the bfloat16 error; rows that
fail the check are unembedded exactly. The result is the top-1 token of the full unembedding (ties go to the lowest
token id, as ``torch.argmax`` breaks them), at about 40% of its cost on a CPU.

The bound, for a row ``h`` (after the final norm) and any token row ``u``: rounding ``h`` and ``u`` to bfloat16
(unit roundoff ``e = 2**-8``) moves the dot product by at most ``(2e + e**2) |h| |u|``; summing ``d`` products in
float32 (as CPU and CUDA bfloat16 matrix products accumulate) adds at most ``d * 2**-24 * (1 + e)**2 |h| |u|``;
rounding the result to bfloat16 adds at most ``e |z| / (1 - e)`` of the rounded ``z``. ``|u|`` is bounded by the
largest row norm; for tokens outside the shortlist ``z`` is at most the shortlist's smallest value, where the bound
is taken. The two error terms are then doubled as a margin.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from extraction.models import LoadedModel
from extraction.readout import Readout

#: Rows unembedded at once (bounds memory at rows x vocabulary logits).
LENS_ROWS = 256
#: Candidates per row kept from the bfloat16 pass.
SHORTLIST = 16
BF16_ROUNDOFF = 2.0 ** -8
FP32_ROUNDOFF = 2.0 ** -24
SAFETY = 2.0


@dataclass
class LensResult:
    """Logit lens of a batch: whole-vocabulary top-1 token and label-word logits at every layer."""

    top_token: np.ndarray  # (batch, layer)
    label_logits: np.ndarray  # (batch, layer, class)


@dataclass(frozen=True)
class _HalfUnembedding:
    """A bfloat16 copy of the unembedding weight and its largest row norm, tied to one version of the weight."""

    version: tuple[int, int]
    weight: torch.Tensor
    max_row_norm: float


_HALVES: "weakref.WeakKeyDictionary[torch.nn.Module, _HalfUnembedding]" = weakref.WeakKeyDictionary()


def _half(readout: Readout) -> _HalfUnembedding:
    """The bfloat16 copy of the read-out's LM head, made once and re-made if the weight changes in place."""
    module, weight = readout.unembedding, readout.unembedding.weight
    version = (weight.data_ptr(), weight._version)
    cached = _HALVES.get(module)
    if cached is None or cached.version != version:
        cached = _HalfUnembedding(version, weight.detach().bfloat16(), float(weight.detach().norm(dim=1).max()))
        _HALVES[module] = cached
    return cached


def shortlist_applies(readout: Readout) -> bool:
    """The certified shortlist serves float32/float64 LM heads whose vocabulary is larger than the shortlist."""
    weight = readout.unembedding.weight
    return weight.dtype in (torch.float32, torch.float64) and weight.shape[0] > SHORTLIST


def _outside_bound(normed: torch.Tensor, last: torch.Tensor, max_row_norm: float) -> torch.Tensor:
    """Per row, an upper bound on the exact logit of every token outside the shortlist, whose bfloat16 logits are
    at most ``last`` (the shortlist's smallest value); see the module docstring."""
    e, d = BF16_ROUNDOFF, normed.shape[-1]
    products = normed.norm(dim=-1) * max_row_norm
    rounding = (2 * e + e * e) * products + d * FP32_ROUNDOFF * (1 + e) ** 2 * products
    output = e * last.abs() / (1 - e)  # z + e|z|/(1-e) grows with z, so the largest value allowed bounds them all
    return last + SAFETY * (rounding + output)


def _exact_top(normed: torch.Tensor, readout: Readout) -> torch.Tensor:
    return readout.project(normed).argmax(dim=-1)


def shortlist_top(readout: Readout, normed: torch.Tensor) -> torch.Tensor:
    """Exact top-1 token of the logits of final-normed rows ``normed`` (rows, d), through the certified shortlist."""
    half = _half(readout)
    weight, bias = readout.unembedding.weight, readout.unembedding.bias
    approx = F.linear(normed.bfloat16(), half.weight)
    if bias is not None:
        approx = approx.to(normed.dtype) + bias
    values, candidates = approx.topk(SHORTLIST, dim=-1)
    exact = torch.einsum("rd,rkd->rk", normed, weight[candidates])
    if bias is not None:
        exact += bias[candidates]
    best = exact.max(dim=-1, keepdim=True).values
    top = torch.where(exact == best, candidates, weight.shape[0]).min(dim=-1).values  # lowest id among ties
    certified = best[:, 0] > _outside_bound(normed, values[:, -1].to(best.dtype), half.max_row_norm)
    if not bool(certified.all()):
        unsure = ~certified
        top[unsure] = _exact_top(normed[unsure], readout)
    return top


@torch.no_grad()
def logit_lens(loaded: LoadedModel, states: torch.Tensor, label_tokens: list[int]) -> LensResult:
    """Read out (B, L+1, d) states in row chunks, keeping only the top-1 token and the label words' logits."""
    readout = loaded.arch.readout
    batch, layers, dim = states.shape
    flat = states.reshape(-1, dim)
    fast = shortlist_applies(readout)
    tops, labels = [], []
    for start in range(0, len(flat), LENS_ROWS):
        normed = readout.normalise(flat[start:start + LENS_ROWS].to(loaded.device))
        if fast:
            tops.append(shortlist_top(readout, normed).cpu())
            raw_labels = readout.project(normed, label_tokens)
        else:
            raw = readout.project(normed)
            tops.append(raw.argmax(dim=-1).cpu())
            raw_labels = raw[:, label_tokens]
        labels.append(readout.postprocess(raw_labels).cpu())
    return LensResult(
        torch.cat(tops).reshape(batch, layers).numpy(),
        torch.cat(labels).reshape(batch, layers, -1).numpy(),
    )
