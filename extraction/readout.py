"""The one read-out: residual-stream states to logits, exactly as the model computes its own output.

A causal LM's logits are ``post(LM_head(final_norm(h)))``, where ``post`` is whatever output post-processing the
config declares: a multiplier or divisor of the logits (muP-style scalings) and final-logit soft-capping
``c * tanh(z / c)``. Those steps are found from a small table of config keys (looked up on the config and on its
``text_config``), never from the model's name. Every place that turns states into logits (capture verification,
the logit lens, the sweep's label read-out) goes through :class:`Readout`, so a post-processing step known here is
applied everywhere, and one not known here makes the capture check fail at load instead of giving wrong numbers.

All post-processing steps are strictly increasing maps of each logit, so the top-1 token of the LM head's raw
output is the top-1 token of the read-out; only logit *values* (label logits, logit differences) change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from extraction.errors import ArchitectureError
from extraction.placement import execution_device

MULTIPLY, DIVIDE, SOFTCAP = "multiply", "divide", "softcap"

#: Config keys that post-process the LM head's output, with what each does (read from the models' own forward
#: passes in transformers). The scalings are applied first (they commute), then the soft-cap.
OUTPUT_STEPS: tuple[tuple[str, str], ...] = (
    ("logit_scale", MULTIPLY),  # Cohere, Cohere 2: logits * logit_scale
    ("lm_head_multiplier", MULTIPLY),  # Falcon-H1: lm_head(h) * lm_head_multiplier
    ("output_multiplier", MULTIPLY),  # Muse Spark: logits * output_multiplier, then the soft-cap
    # Granite family: logits / logits_scaling; MiniCPM 3 divides h before the bias-free head (the same thing).
    # HyperCLOVA X multiplies by its key of this name instead: its load fails the capture check with a message.
    ("logits_scaling", DIVIDE),
    ("final_logit_softcapping", SOFTCAP),  # Gemma 2, Gemma 3 (None there), ...: c * tanh(logits / c)
)


def declared(config: Any, key: str) -> Any:
    """The value of ``key`` on ``config`` or, for multimodal wrappers, on its ``text_config``; None if neither has
    it."""
    for source in (config, getattr(config, "text_config", None)):
        value = getattr(source, key, None) if source is not None else None
        if value is not None:
            return value
    return None


def output_postprocessing(config: Any) -> tuple[float, float | None]:
    """The (scale, softcap) that ``config`` declares: logits become ``softcap * tanh(scale * z / softcap)``
    (``scale * z`` when softcap is None)."""
    scale, softcap = 1.0, None
    for key, operation in OUTPUT_STEPS:
        value = declared(config, key)
        if value is None or operation == SOFTCAP and not value:
            continue
        value = float(value)
        if value <= 0:
            raise ArchitectureError(f"the config's {key} is {value}; the read-out needs a positive value")
        if operation == SOFTCAP:
            softcap = value
        else:
            scale *= value if operation == MULTIPLY else 1.0 / value
    return scale, softcap


@dataclass(frozen=True)
class Readout:
    """Final norm, LM head (all rows or some token rows) and the output post-processing of one model."""

    final_norm: nn.Module
    unembedding: nn.Module
    scale: float = 1.0
    softcap: float | None = None

    @classmethod
    def of(cls, final_norm: nn.Module, unembedding: nn.Module, config: Any) -> "Readout":
        """The read-out of a model whose final norm, LM head and config these are."""
        return cls(final_norm, unembedding, *output_postprocessing(config))

    def normalise(self, states: torch.Tensor) -> torch.Tensor:
        """The final norm of ``states`` (..., d), in the LM head's dtype as the model feeds it, on the LM head's
        device (the two may sit on different devices of a split model)."""
        normed = self.final_norm(states.to(execution_device(self.final_norm), self.unembedding.weight.dtype))
        return normed.to(execution_device(self.unembedding))

    def project(self, normed: torch.Tensor, tokens: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
        """The LM head's raw output for final-normed rows: every token, or only the rows of ``tokens``."""
        normed = normed.to(execution_device(self.unembedding))
        if tokens is None:
            return self.unembedding(normed)
        weight, bias = self.unembedding.weight, getattr(self.unembedding, "bias", None)
        index = torch.as_tensor(tokens, dtype=torch.long, device=weight.device)
        return F.linear(normed, weight[index], None if bias is None else bias[index])

    def postprocess(self, logits: torch.Tensor) -> torch.Tensor:
        """The declared scaling and soft-cap applied to raw LM head output, in float32."""
        logits = logits.float()
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = self.softcap * torch.tanh(logits / self.softcap)
        return logits

    @torch.no_grad()
    def __call__(self, states: torch.Tensor, tokens: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
        """Float32 logits of residual states (..., d), over the whole vocabulary or only ``tokens``."""
        return self.postprocess(self.project(self.normalise(states), tokens))

    def describe(self) -> str:
        """The read-out in words, e.g. ``final norm, LM head, x 0.0625, soft-cap 30``."""
        steps = ["final norm", "LM head"]
        if self.scale != 1.0:
            steps.append(f"x {self.scale:g}")
        if self.softcap is not None:
            steps.append(f"soft-cap {self.softcap:g}")
        return ", ".join(steps)
