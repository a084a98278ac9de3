"""The lab model's hook points and the axes of their values, in one table shared by the model and the clamps.

Each entry maps a point name to (dims, head axis, position axis) of its value, None where it has no such axis
(values are (R, B, ...) with R runs and B examples; for attention scores and patterns the position axis is the
query axis). Block points are named ``blocks.<b>.<name>``.
"""

from __future__ import annotations

#: Per-block points: name -> (dims, head axis, position axis).
BLOCK_AXES: dict[str, tuple[int, int | None, int | None]] = {
    "attn.q": (5, 3, 2), "attn.k": (5, 3, 2), "attn.v": (5, 3, 2), "attn.scores": (5, 2, 3),
    "attn.pattern": (5, 2, 3), "attn.z": (5, 3, 2), "attn.head_out": (5, 3, 2), "resid_post": (4, None, 2),
}
#: Model-level points: name -> (dims, head axis, position axis).
MODEL_AXES: dict[str, tuple[int, int | None, int | None]] = {
    "embed": (4, None, 2), "readout.input": (3, None, None), "readout.hidden": (3, None, None),
    "logits": (3, None, None),
}
BLOCK_POINTS = tuple(BLOCK_AXES)


def model_points(readout: str) -> tuple[str, ...]:
    """The model-level points after the blocks of a model with read-out ``readout`` (a linear read-out has no
    hidden layer)."""
    return ("readout.input", "logits") if readout == "linear" else ("readout.input", "readout.hidden", "logits")
