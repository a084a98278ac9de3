"""Weight checkpoints in safetensors: the stacked weights (leading run dimension), the training data generators'
states, and the step, written atomically (a temporary file renamed into place) so a kill never leaves half a file.

Files are ``<run>/checkpoints/step_<8 digits>.safetensors``; tensors are the weights by dotted name and
``rng.train`` (runs, state bytes) and the optimizer's state as ``optimizer.<param index>.<name>`` (none for plain
SGD; Adam's moments and step counts otherwise); metadata holds ``step`` and the config as JSON.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, safe_open, save_file

RNG_KEY, OPTIMIZER_PREFIX = "rng.train", "optimizer."


@dataclass(frozen=True)
class Checkpoint:
    step: int
    weights: dict[str, torch.Tensor]
    rng_states: list[torch.Tensor]
    optimizer: dict[str, torch.Tensor]
    path: Path


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The optimizer's per-parameter state as flat named tensors (its hyper-parameters come from the config)."""
    return {f"{OPTIMIZER_PREFIX}{index}.{name}": torch.as_tensor(value).clone()
            for index, state in optimizer.state_dict()["state"].items() for name, value in state.items()}


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    """Load the state saved by :func:`optimizer_tensors` into a freshly built optimizer of the same config."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, name = key[len(OPTIMIZER_PREFIX):].split(".", 1)
        state.setdefault(int(index), {})[name] = value
    saved = optimizer.state_dict()
    optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})


def checkpoint_path(directory: Path, step: int) -> Path:
    return directory / f"step_{step:08d}.safetensors"


def save(directory: Path, step: int, weights: dict[str, torch.Tensor], rng_states: list[torch.Tensor],
         optimizer: torch.optim.Optimizer, config: dict, *, keep_old: bool = False) -> Path:
    """Write one checkpoint and delete the older ones unless ``keep_old`` (the store holds the curves; resuming
    needs only the latest)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = checkpoint_path(directory, step)
    tensors = {name: value.detach().contiguous() for name, value in weights.items()}
    tensors[RNG_KEY] = torch.stack(rng_states)
    tensors.update(optimizer_tensors(optimizer))
    temporary = path.with_suffix(".tmp")
    save_file(tensors, str(temporary), metadata={"step": str(step), "config": json.dumps(config, sort_keys=True)})
    os.replace(temporary, path)
    for old in [] if keep_old else directory.glob("step_*.safetensors"):
        if old != path:
            old.unlink()
    return path


def restore_weights(weights: dict[str, torch.Tensor], saved: Checkpoint) -> None:
    """Copy a checkpoint's weights into a model's (``LabTransformer.named_weights()``) in place."""
    with torch.no_grad():
        for name, weight in weights.items():
            weight.copy_(saved.weights[name])


def saved_steps(directory: Path) -> list[int]:
    """The steps of the checkpoints in ``directory``, in order."""
    return [int(path.stem.split("_")[1]) for path in sorted(directory.glob("step_*.safetensors"))]


def latest(directory: Path) -> Path | None:
    paths = sorted(directory.glob("step_*.safetensors")) if directory.exists() else []
    return paths[-1] if paths else None


def load(path: Path) -> Checkpoint:
    with safe_open(str(path), framework="pt") as handle:
        step = int(handle.metadata()["step"])
    tensors = load_file(str(path))
    rng = tensors.pop(RNG_KEY)
    moments = {key: tensors.pop(key) for key in list(tensors) if key.startswith(OPTIMIZER_PREFIX)}
    return Checkpoint(step, tensors, [state.clone() for state in rng.unbind(0)], moments, path)  # own storage

