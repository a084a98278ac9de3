"""Re-running the upper blocks of a decoder from a recorded clean pass, as the fast sweeps do.

One clean forward pass records every decoder layer's positional and keyword arguments (masks, position embeddings,
...); a fast method then re-runs only blocks ``b..L-1`` from block ``b``'s recorded input for stacked copies of the
batch rows, each copy under a different intervention, instead of one full forward pass per intervention.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch

from extraction.architecture import Architecture


class LayerCalls:
    """Records each decoder layer's positional and keyword arguments, and the last layer's output, in one pass."""

    def __init__(self, arch: Architecture):
        self.arch = arch
        self.calls: list[tuple[tuple, dict] | None] = [None] * arch.n_layers
        self.final: torch.Tensor | None = None

    @contextmanager
    def recording(self) -> Iterator["LayerCalls"]:
        def keep(layer: int):
            def hook(module, args, kwargs):
                self.calls[layer] = (args, kwargs)
            return hook

        def keep_final(module, args, output):
            self.final = (output[0] if isinstance(output, tuple) else output)[:, -1]

        handles = [layer.register_forward_pre_hook(keep(i), with_kwargs=True)
                   for i, layer in enumerate(self.arch.layers)]
        handles.append(self.arch.layers[-1].register_forward_hook(keep_final))
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()


def _take(value: Any, batch: int, rows: torch.Tensor) -> Any:
    """Select ``rows`` (with repeats) of every tensor whose first dimension is the batch; leave the rest alone."""
    if torch.is_tensor(value):
        return value.index_select(0, rows.to(value.device)) if value.ndim and value.shape[0] == batch else value
    if isinstance(value, (tuple, list)):
        return type(value)(_take(item, batch, rows) for item in value)
    if isinstance(value, dict):
        return {key: _take(item, batch, rows) for key, item in value.items()}
    return value


def recorded_input(call: tuple[tuple, dict], rows: torch.Tensor) -> torch.Tensor:
    """A recorded call's hidden-state input taken at ``rows`` (with repeats), on the device it was recorded on."""
    args, kwargs = call
    hidden = args[0] if args else kwargs["hidden_states"]
    return hidden.index_select(0, rows.to(hidden.device))


def call_layer(layer: torch.nn.Module, hidden: torch.Tensor, call: tuple[tuple, dict], batch: int,
                rows: torch.Tensor) -> torch.Tensor:
    """Run ``layer`` on ``hidden`` with a recorded call's other arguments, taken at ``rows`` of the batch."""
    args, kwargs = call
    if args:
        output = layer(hidden, *_take(args[1:], batch, rows), **_take(kwargs, batch, rows))
    else:
        others = {key: value for key, value in kwargs.items() if key != "hidden_states"}
        output = layer(hidden_states=hidden, **_take(others, batch, rows))
    return output[0] if isinstance(output, tuple) else output
