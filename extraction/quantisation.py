"""Quantised loading: a transformers quantisation config from a config object, a short name or a table.

A table (a dict, a TOML table of the study config, a JSON object on the command line) names its kind with
``quant_method``, exactly as a quantised model's ``config.json`` does, e.g. ``{"quant_method": "bitsandbytes",
"load_in_4bit": true, "bnb_4bit_quant_type": "nf4"}``; the remaining keys are that kind's options. The short names
of :data:`SHORTHANDS` stand for the common tables. Whether the kind's package (and device) is present is checked by
transformers when the model loads; :func:`extraction.models.load_model` turns its complaint into one line.
"""

from __future__ import annotations

import json
from typing import Any

from extraction.errors import ModelLoadError
from extraction.placement import json_object

#: Short names for common quantisation tables.
SHORTHANDS: dict[str, dict[str, Any]] = {
    "bnb-4bit": {"quant_method": "bitsandbytes", "load_in_4bit": True},
    "bnb-nf4": {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
    "bnb-8bit": {"quant_method": "bitsandbytes", "load_in_8bit": True},
}


def quantization_kinds() -> tuple[str, ...]:
    """The ``quant_method`` values this transformers knows."""
    from transformers.utils.quantization_config import QuantizationMethod

    return tuple(method.value for method in QuantizationMethod)


def quantization_config(value: Any) -> Any:
    """A transformers quantisation config from ``value``: None or "" (no quantisation), a config object (as is), a
    name from :data:`SHORTHANDS`, a JSON object text, or a table naming its kind with ``quant_method``."""
    from transformers.quantizers.auto import AutoQuantizationConfig
    from transformers.utils.quantization_config import QuantizationConfigMixin

    if value is None or value == "" or value == {} or isinstance(value, QuantizationConfigMixin):
        return value or None
    if isinstance(value, str):
        if value.lstrip().startswith("{"):
            return quantization_config(json_object(value, "quantization"))
        if value not in SHORTHANDS:
            raise ModelLoadError(f"unknown quantization {value!r}; use {', '.join(SHORTHANDS)} or a table with "
                                 "quant_method and its options")
        value = SHORTHANDS[value]
    if not isinstance(value, dict):
        raise ModelLoadError(f"quantization must be a name, a table or a transformers quantization config, not "
                             f"{value!r}")
    kind = value.get("quant_method")
    if kind not in quantization_kinds():
        raise ModelLoadError(f"the quantization table must name its kind as quant_method (one of "
                             f"{', '.join(quantization_kinds())}), not {kind!r}")
    try:
        return AutoQuantizationConfig.from_dict(dict(value))
    except (ValueError, TypeError) as error:
        raise ModelLoadError(f"quantization {kind}: {str(error).splitlines()[0]}") from None


def describe(config: Any) -> dict[str, Any] | None:
    """A quantisation config as JSON values (every option, defaults included) for a store's provenance."""
    return None if config is None else json.loads(config.to_json_string(use_diff=False))
