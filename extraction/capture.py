"""Forward hooks that keep only the query position of every layer's residual-stream state.

Layer convention: state 0 is the embedding output as the first block reads it (position embeddings and scaling
included), state ``l`` (1..L) is the output of
block ``l-1``. All states are taken *before* the final norm; the final norm is applied only when unembedding. The
full sequence of states is never kept: each hook slices out one position per prompt as the forward pass goes.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from extraction.architecture import Architecture
from extraction.errors import ArchitectureError

LAYER_CONVENTION = (
    "layer 0 = embedding output (the input of block 0); layer l = output of block l-1 (residual stream); "
    "every layer, the last included, is taken before the final norm"
)


def query_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row (works for left and right padding)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.bool() * (positions + 1)).argmax(dim=1)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that ignore left padding, so batched prompts see the same positions as unbatched ones."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


def _hidden(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


class QueryStates:
    """Collects the query-position state of the embedding and of each block during one forward pass."""

    def __init__(self, arch: Architecture, query_index: torch.Tensor):
        self.arch = arch
        self.query_index = query_index
        self.states: list[torch.Tensor | None] = [None] * arch.n_states

    def _hook(self, slot: int):
        def keep_query(module, args, output):
            hidden = _hidden(output)
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            self.states[slot] = hidden[rows, self.query_index.to(hidden.device)].detach()

        return keep_query

    def _pre_hook(self):
        def keep_block_input(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            self.states[0] = hidden[rows, self.query_index.to(hidden.device)].detach()

        return keep_block_input

    def stacked(self) -> torch.Tensor:
        """States as (batch, n_layers + 1, hidden)."""
        missing = [slot for slot, state in enumerate(self.states) if state is None]
        if missing:
            raise ArchitectureError(f"no state was captured for layers {missing}; the forward pass skipped them")
        return torch.stack([state.float().cpu() for state in self.states], dim=1)


@contextmanager
def capture_query_states(arch: Architecture, query_index: torch.Tensor) -> Iterator[QueryStates]:
    """Hook the input of block 0 and every block's output; the hooks are removed on exit, even after an error."""
    capture = QueryStates(arch, query_index)
    handles = [arch.layers[0].register_forward_pre_hook(capture._pre_hook(), with_kwargs=True)]
    handles += [layer.register_forward_hook(capture._hook(i + 1)) for i, layer in enumerate(arch.layers)]
    try:
        yield capture
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def forward_last(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The model's own logits at the last position only (B, V): no unembedding of the other positions."""
    output = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids(attention_mask),
        logits_to_keep=1,
        use_cache=False,
    )
    return output.logits[:, -1].float()


@torch.no_grad()
def run_with_capture(loaded, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch: query states (B, L+1, d) and the model's final logits at the query (B, V).

    Prompts must be left-padded so that the query is the last position of every row.
    """
    device = loaded.device
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    with capture_query_states(loaded.arch, query_positions(attention_mask)) as capture:
        logits = forward_last(loaded.model, input_ids, attention_mask)
    return capture.stacked(), logits


@torch.no_grad()
def verify_capture(loaded, text: str = "The capital of France is Paris. The capital of Italy is", atol: float = 1e-3):
    """Check that the read-out of the captured last state reproduces the model's own final logits."""
    encoded = loaded.tokenizer([text], return_tensors="pt")
    states, logits = run_with_capture(loaded, encoded["input_ids"], encoded["attention_mask"])
    readout = loaded.arch.readout
    lens = readout(states[:, -1].to(loaded.device)).cpu()
    scale = logits.abs().max().item() + 1e-6
    error = (lens - logits.cpu()).abs().max().item() / scale
    tolerance = atol if loaded.arch.unembedding.weight.dtype == torch.float32 else 2e-2
    if error > tolerance:
        raise ArchitectureError(
            f"the read-out of the captured final state ({readout.describe()}) does not reproduce the model's logits "
            f"(relative error {error:.2e}): this architecture's final norm, LM head or output post-processing is "
            "not the one found; add what it uses to the tables in extraction/architecture.py or extraction/readout.py"
        )
