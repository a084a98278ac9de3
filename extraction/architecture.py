"""Declarative discovery of the parts of a causal LM that the toolkit hooks.

No model names appear here: the decoder layers, final norm, embedding, unembedding, each layer's attention module
and its output projection are found from the config and the module tree, using small tables of the attribute
names that Hugging Face architectures use; the read-out (final norm, LM head, declared output post-processing) is
:class:`extraction.readout.Readout`. Anything that cannot be found fails with a message naming what is
missing, so a new architecture needs one table entry, not a new branch.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from extraction.errors import ArchitectureError
from extraction.placement import execution_device
from extraction.readout import Readout, declared

#: Dotted paths (relative to the causal LM) where the final norm lives, in the order they are tried.
FINAL_NORM_PATHS = (
    "model.norm",
    "model.final_layernorm",
    "model.decoder.final_layer_norm",
    "model.language_model.norm",
    "transformer.ln_f",
    "transformer.norm_f",
    "gpt_neox.final_layer_norm",
    "backbone.norm_f",
)
#: Attribute names of a decoder layer's attention module.
ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention", "mixer")
#: Attribute names of an attention module's output projection (the input of which is the heads' concatenation).
OUTPUT_PROJECTION_NAMES = ("o_proj", "out_proj", "c_proj", "dense", "wo", "proj")
#: Config keys for the number of query heads, key/value heads and layers.
N_HEADS_KEYS = ("num_attention_heads", "n_head", "num_heads", "n_heads")
N_KV_HEADS_KEYS = ("num_key_value_heads", "num_kv_heads", "n_head_kv", "multi_query_group_num")
N_LAYERS_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
HIDDEN_KEYS = ("hidden_size", "n_embd", "d_model")
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
#: Largest relative error of a norm's fitted array form that still counts as exact (float32 fit: about 1e-7).
FORM_TOLERANCE = 1e-4


@dataclass(frozen=True)
class Architecture:
    """Where the hookable parts of a causal LM are, and the sizes that head arithmetic needs."""

    layers: nn.ModuleList
    embedding: nn.Module
    readout: Readout
    attentions: tuple[nn.Module, ...]
    output_projections: tuple[nn.Module, ...]
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_context: int | None
    layers_path: str

    @property
    def final_norm(self) -> nn.Module:
        """The norm applied to the last residual state before the LM head."""
        return self.readout.final_norm

    @property
    def unembedding(self) -> nn.Module:
        """The LM head (output embedding)."""
        return self.readout.unembedding

    @property
    def n_states(self) -> int:
        """Number of residual-stream states per position: the embedding output plus one per block."""
        return self.n_layers + 1


def _config_value(config, keys: tuple[str, ...], what: str, required: bool = True):
    for key in keys:
        value = declared(config, key)
        if value is not None:
            return value
    if required:
        raise ArchitectureError(f"cannot find the {what} in the model config (looked for {', '.join(keys)})")
    return None


def _get_path(root: nn.Module, path: str) -> nn.Module | None:
    module = root
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def _find_layers(model: nn.Module, n_layers: int) -> tuple[str, nn.ModuleList]:
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == n_layers
    ]
    if not candidates:
        raise ArchitectureError(
            f"cannot find the decoder layers: no ModuleList of length {n_layers} (the config's layer count)"
        )
    # The shallowest list of the right length is the decoder stack (nested lists belong to blocks).
    return min(candidates, key=lambda item: item[0].count("."))


def _find_child(parent: nn.Module, names: tuple[str, ...], what: str, where: str) -> nn.Module:
    for name in names:
        child = getattr(parent, name, None)
        if isinstance(child, nn.Module):
            return child
    raise ArchitectureError(f"cannot find the {what} in {where} (looked for attributes {', '.join(names)})")


def _find_final_norm(model: nn.Module) -> nn.Module:
    for path in FINAL_NORM_PATHS:
        module = _get_path(model, path)
        if module is not None:
            return module
    raise ArchitectureError(f"cannot find the final norm (looked for {', '.join(FINAL_NORM_PATHS)})")


def _linear_in_features(module: nn.Module) -> int | None:
    if isinstance(getattr(module, "in_features", None), int):  # nn.Linear and its quantised versions (packed weight)
        return module.in_features
    weight = getattr(module, "weight", None)
    if weight is None or weight.ndim != 2:
        return None
    # nn.Linear stores (out, in); GPT-2's Conv1D stores (in, out) and has `nf` = out.
    return weight.shape[0] if hasattr(module, "nf") else weight.shape[1]


def discover_architecture(model: nn.Module) -> Architecture:
    """Map a Hugging Face causal LM onto an :class:`Architecture`, or fail saying what was not found."""
    config = model.config
    n_layers = int(_config_value(config, N_LAYERS_KEYS, "number of layers"))
    n_heads = int(_config_value(config, N_HEADS_KEYS, "number of attention heads"))
    n_kv = _config_value(config, N_KV_HEADS_KEYS, "number of key/value heads", required=False)
    hidden = int(_config_value(config, HIDDEN_KEYS, "hidden size"))
    head_dim = _config_value(config, ("head_dim",), "head dimension", required=False)
    head_dim = int(head_dim) if head_dim else hidden // n_heads
    max_context = _config_value(config, CONTEXT_KEYS, "context length", required=False)

    layers_path, layers = _find_layers(model, n_layers)
    attentions, projections = [], []
    for index, layer in enumerate(layers):
        where = f"{layers_path}[{index}]"
        attention = _find_child(layer, ATTENTION_NAMES, "attention module", where)
        projection = _find_child(attention, OUTPUT_PROJECTION_NAMES, "attention output projection", f"{where}.attn")
        in_features = _linear_in_features(projection)
        if in_features != n_heads * head_dim:
            raise ArchitectureError(
                f"the attention output projection of {where} takes {in_features} inputs, but the config says "
                f"{n_heads} heads x head_dim {head_dim} = {n_heads * head_dim}; cannot slice it into heads"
            )
        attentions.append(attention)
        projections.append(projection)

    embedding = model.get_input_embeddings()
    unembedding = model.get_output_embeddings()
    if embedding is None or unembedding is None:
        raise ArchitectureError("the model has no input or output embeddings (is it a causal LM with an LM head?)")
    return Architecture(
        layers=layers,
        embedding=embedding,
        readout=Readout.of(_find_final_norm(model), unembedding, config),
        attentions=tuple(attentions),
        output_projections=tuple(projections),
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=int(n_kv) if n_kv else n_heads,
        head_dim=head_dim,
        hidden_size=hidden,
        vocab_size=int(unembedding.weight.shape[0]),
        max_context=int(max_context) if max_context else None,
        layers_path=layers_path,
    )


@dataclass(frozen=True)
class NormForm:
    """The final norm written as ``gain * normalise(x) + bias``, normalise = (x - mean if center) / RMS.

    Knowing this form lets array code apply the logit lens to states it builds itself (e.g. low-rank
    reconstructions) without the model. ``exact`` is False when the norm does not have this form.
    """

    gain: torch.Tensor
    bias: torch.Tensor
    center: bool
    exact: bool


@torch.no_grad()
def final_norm_form(arch: Architecture, samples: int = 16, seed: int = 0) -> NormForm:
    """Fit the final norm as RMSNorm or LayerNorm from random inputs, and check the fit is exact.

    The fit runs on a float32 copy of the norm (the model is untouched): in bfloat16 the norm's own rounding
    (about 4e-3) would hide the form. The result is the form of the norm's weights as stored in the model's dtype.
    """
    generator = torch.Generator().manual_seed(seed)
    norm = copy.deepcopy(arch.final_norm).float()
    device = execution_device(arch.final_norm)
    x = torch.randn(samples, arch.hidden_size, generator=generator).to(device)
    y = norm(x).float()
    for center in (False, True):
        z = x - x.mean(dim=1, keepdim=True) if center else x
        z = z / z.pow(2).mean(dim=1, keepdim=True).sqrt()
        # Per-dimension least squares of y on [z, 1].
        z_mean, y_mean = z.mean(0), y.mean(0)
        gain = ((z - z_mean) * (y - y_mean)).sum(0) / (z - z_mean).pow(2).sum(0)
        bias = y_mean - gain * z_mean
        residual = (y - (gain * z + bias)).abs().max() / (y.abs().max() + 1e-12)
        if residual < FORM_TOLERANCE:
            return NormForm(gain.cpu(), bias.cpu(), center, True)
    return NormForm(torch.ones(arch.hidden_size), torch.zeros(arch.hidden_size), False, False)
