"""Where a model's weights go: device names, ``device_map``, ``max_memory`` and the attention implementation.

These options pass through :func:`extraction.models.load_model` to ``from_pretrained``. They are checked here before
any weight is read, so a typo fails in one line instead of deep inside transformers or accelerate, and turned into
JSON-safe values for a store's provenance. After loading, :func:`execution_device` says where a module computes
(an offloaded module's weights rest on ``meta`` but compute on its hook's device) and :func:`keep_resident` keeps
the modules the toolkit reads directly (the final norm and the LM head) loaded on that device.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import nn

from extraction.errors import ModelLoadError

#: ``device_map`` strings that ask accelerate to place the modules itself (anything else names one device).
PLACEMENT_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
#: ``device_map`` values and ``max_memory`` keys that are not compute devices: weights kept there are offloaded.
OFFLOAD_TARGETS = ("cpu", "disk")


def check_device(name: Any) -> str:
    """A torch device name (or accelerator index) that exists on this machine, as text; else a clear error."""
    if isinstance(name, str) and name.isdigit():
        name = int(name)
    if isinstance(name, int) and not isinstance(name, bool):
        return check_device(f"{_accelerator_type()}:{name}")
    try:
        device = torch.device(str(name))
    except (RuntimeError, TypeError):
        raise ModelLoadError(f"unknown device {name!r}; use cpu, cuda, cuda:<index>, mps or a GPU index") from None
    if device.type in ("cpu", "meta"):
        return str(device)
    backend = getattr(torch, device.type, None)
    count = backend.device_count() if hasattr(backend, "device_count") else 0
    if (device.index or 0) >= count:
        raise ModelLoadError(f"device {device} is not available here (this machine has {count} {device.type} "
                             "device(s)); pick another or leave it out")
    return str(device)


def _accelerator_type() -> str:
    """The machine's accelerator type (what a bare index in a device map means), cuda when there is none."""
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    current = accelerator.current_accelerator() if accelerator is not None and accelerator.is_available() else None
    return current.type if current is not None else "cuda"


def _map_target(value: Any) -> Any:
    """One ``device_map`` value: an accelerator index, an offload target or a device name (checked)."""
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        check_device(value)
        return value
    if isinstance(value, str) and value in OFFLOAD_TARGETS:
        return value
    return check_device(value)


def check_device_map(device_map: Any) -> str | dict[str, Any] | None:
    """``device_map`` checked: None, a strategy (auto, balanced, ...), one device, or module name -> device."""
    if device_map is None or device_map == "" or device_map in PLACEMENT_STRATEGIES:
        return device_map or None
    if isinstance(device_map, dict):
        if not device_map:
            raise ModelLoadError("device_map is empty; map module names to devices, e.g. {\"\": \"cuda:0\"}")
        bad = [key for key in device_map if not isinstance(key, str)]
        if bad:
            raise ModelLoadError(f"device_map keys must be module names (text), not {bad[0]!r}")
        return {key: _map_target(value) for key, value in device_map.items()}
    if isinstance(device_map, str):
        try:
            torch.device(device_map)
        except RuntimeError:
            raise ModelLoadError(f"device_map {device_map!r} is neither one of {', '.join(PLACEMENT_STRATEGIES)} "
                                 "nor a device") from None
        return check_device(device_map)
    raise ModelLoadError(f"device_map must be one of {', '.join(PLACEMENT_STRATEGIES)}, a device or a table of "
                         f"module -> device, not {device_map!r}")


def check_max_memory(max_memory: Any) -> dict[int | str, int | str] | None:
    """``max_memory`` checked: device (GPU index, cuda:<i>, cpu, mps, disk) -> size (bytes, or text like 20GiB)."""
    from accelerate.utils import convert_file_size_to_int

    if max_memory is None or max_memory == {}:
        return None
    if not isinstance(max_memory, dict):
        raise ModelLoadError(f"max_memory must map devices to sizes, e.g. {{0: \"20GiB\", \"cpu\": \"60GiB\"}}, "
                             f"not {max_memory!r}")
    checked: dict[int | str, int | str] = {}
    for key, size in max_memory.items():
        device = _memory_key(key)
        if isinstance(size, bool) or not isinstance(size, (int, str)):
            raise ModelLoadError(f"max_memory[{key!r}] must be a size in bytes or text like \"20GiB\", not {size!r}")
        try:
            if convert_file_size_to_int(size) < 0:
                raise ValueError
        except ValueError:
            raise ModelLoadError(f"max_memory[{key!r}] = {size!r} is not a size; write bytes or text like "
                                 "\"20GiB\", \"500MB\"") from None
        checked[device] = size
    return checked


def _memory_key(key: Any) -> int | str:
    """A ``max_memory`` key as accelerate wants it: an accelerator index, or cpu / mps / disk."""
    if isinstance(key, str) and key.isdigit():
        key = int(key)
    if isinstance(key, str) and key in ("disk", "mps"):
        return key
    device = torch.device(check_device(key))
    if device.type == "cpu":
        return "cpu"
    return device.index or 0


def parse_device_map(text: str | None) -> str | dict | None:
    """A ``--device-map`` value: a strategy or device name as is, or a JSON object of module -> device."""
    return json_object(text, "--device-map") if text and text.lstrip().startswith("{") else text


def parse_max_memory(text: str | None) -> dict[str, str] | None:
    """A ``--max-memory`` value: ``DEVICE=SIZE`` pairs separated by commas (``0=20GiB,1=20GiB,cpu=60GiB``) or a JSON
    object."""
    if not text:
        return None
    if text.lstrip().startswith("{"):
        return json_object(text, "--max-memory")
    pairs = [part.partition("=") for part in text.split(",") if part.strip()]
    if any(not sep or not key.strip() or not size.strip() for key, sep, size in pairs):
        raise ModelLoadError(f"--max-memory {text!r} is malformed; write DEVICE=SIZE pairs, e.g. 0=20GiB,cpu=60GiB")
    return {key.strip(): size.strip() for key, _, size in pairs}


def json_object(text: str, option: str) -> dict:
    """``text`` parsed as a JSON object, or a clear error naming ``option``."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ModelLoadError(f"{option} is not valid JSON ({error.msg} at character {error.pos})") from None
    if not isinstance(value, dict):
        raise ModelLoadError(f"{option} must be a JSON object, not {text!r}")
    return value


def attention_implementations() -> tuple[str, ...]:
    """The attention implementations this transformers knows (whether their packages are installed or not)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ("eager", *ALL_ATTENTION_FUNCTIONS.keys())


def check_attn_implementation(name: str | None) -> str | None:
    """An attention implementation transformers knows, or a hub kernel (``org/repo``); else a clear error."""
    if not name or "/" in name or name in attention_implementations():
        return name or None
    raise ModelLoadError(f"unknown attention implementation {name!r}; use one of "
                         f"{', '.join(attention_implementations())}")


def json_safe(value: Any) -> Any:
    """A placement option as JSON values (device objects and keys as text) for a store's provenance."""
    if isinstance(value, dict):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, torch.device):
        return str(value)
    return value


def execution_device(module: nn.Module) -> torch.device:
    """The device ``module`` computes on: its accelerate hook's device when it has one (an offloaded module's
    weights rest on ``meta``), else the device of its first parameter or buffer (CPU for none)."""
    hook_device = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
    if isinstance(hook_device, int):
        return torch.device(_accelerator_type(), hook_device)
    if hook_device is not None:
        return torch.device(hook_device)
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


def keep_resident(module: nn.Module) -> None:
    """Load an offloaded module's weights onto its execution device for good (no-op for a resident module).

    The toolkit reads the final norm's and the LM head's weights directly (label-word rows, the norm's form), so
    these two must not rest on ``meta``; they are what a forward pass loads last anyway.
    """
    from accelerate.utils import has_offloaded_params

    for part in module.modules():
        if has_offloaded_params(part):
            hook = part._hf_hook
            hook.pre_forward(part)
            hook.offload = False
