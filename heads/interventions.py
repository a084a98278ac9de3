"""Head ablation and residual-stream injection as context managers around a caller's own forward passes.

These are the intervention objects of :mod:`extraction.interventions` entered as ``with`` blocks: they register
their PyTorch hooks on entry, remove them in ``finally`` (so the model is unchanged after the block, even when it
raises) and yield the intervention's record. To extract a store group, do not wrap ``extract`` in them: pass the
object, which the run applies and records itself::

    with heads.ablate(loaded, ih):                       # your own forward passes
        logits = loaded.model(**batch).logits
    extract(loaded, "store.zarr", setting="ablate_ih", intervention=heads.HeadAblation(ih))

See :mod:`extraction.interventions` for what each one changes exactly (the head slice before the output
projection; the residual state convention: state 0 = embedding output, state l = output of block l-1).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Sequence

import torch

from extraction.architecture import Architecture
from extraction.errors import InterventionError
from extraction.interventions import MODES, HeadAblation, Injection, head_patch_hook  # noqa: F401  (re-exported)
from extraction.interventions import check_heads as check_intervention_heads
from heads.errors import HeadsError
from heads.selection import Head


def check_heads(arch: Architecture, heads: Sequence[Head]) -> list[Head]:
    """Validated, de-duplicated heads for heads' own tools (sweep, task vectors), whose mistakes are HeadsErrors."""
    try:
        return check_intervention_heads(arch, heads)
    except InterventionError as error:
        raise HeadsError(str(error)) from None


def ablate(target: Any, heads: Sequence[Head], *, mode: str = "zero",
           means: torch.Tensor | None = None) -> AbstractContextManager[dict[str, Any]]:
    """Ablate ``heads`` at every position inside the block: ``zero`` their outputs or replace them by ``means``.

    ``means`` (n_layers, n_heads, head_dim) are per-head mean outputs, e.g. from :func:`heads.head_means`.
    ``target`` is a ``LoadedModel`` or a Hugging Face causal LM. Yields the record of :class:`HeadAblation`.
    """
    return HeadAblation(heads, mode=mode, means=means).applied(target)


def inject(target: Any, vector: torch.Tensor, layer: int, *, position: str | int = "last",
           scale: float = 1.0) -> AbstractContextManager[dict[str, Any]]:
    """Add ``scale * vector`` to residual state ``layer`` (0..L) at one position inside the block.

    ``position`` is ``"last"`` (the query under left padding) or an index into the sequence as fed to the model
    (negative indices count from the end). Yields the record of :class:`Injection`.
    """
    return Injection(vector, layer, position=position, scale=scale).applied(target)
