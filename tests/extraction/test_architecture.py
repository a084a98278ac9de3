import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from extraction.architecture import discover_architecture, final_norm_form
from extraction.errors import ArchitectureError
from extraction.extractor import extract
from extraction.models import load_model


@pytest.mark.parametrize(
    "name, heads, kv_heads, head_dim, layers_path",
    [("gemma3", 4, 2, 24, "model.layers"), ("llama", 4, 2, 12, "model.layers"), ("gpt2", 4, 4, 12, "transformer.h")],
)
def test_discovery_reads_sizes_from_config_and_modules(tiny_model_dirs, name, heads, kv_heads, head_dim, layers_path):
    arch = load_model(str(tiny_model_dirs[name])).arch
    assert (arch.n_heads, arch.n_kv_heads, arch.head_dim, arch.layers_path) == (heads, kv_heads, head_dim, layers_path)
    assert len(arch.output_projections) == arch.n_layers == len(arch.layers)
    assert arch.n_states == arch.n_layers + 1


def test_gemma_head_dim_is_not_hidden_over_heads(tiny_gemma):
    arch = tiny_gemma.arch
    assert arch.head_dim * arch.n_heads != arch.hidden_size
    assert arch.output_projections[0].in_features == arch.n_heads * arch.head_dim


def test_unknown_architecture_fails_naming_what_is_missing():
    class Config:
        num_hidden_layers, num_attention_heads, hidden_size = 2, 2, 8

    class NoLayers(nn.Module):
        config = Config()

    with pytest.raises(ArchitectureError, match="decoder layers"):
        discover_architecture(NoLayers())


def test_missing_attention_is_reported(tiny_gemma):
    class Config:
        num_hidden_layers, num_attention_heads, hidden_size = 2, 2, 8

    class Odd(nn.Module):
        config = Config()

        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)])

    with pytest.raises(ArchitectureError, match="attention module"):
        discover_architecture(Odd())


@pytest.mark.parametrize("name, center", [("gemma3", False), ("gpt2", True), ("gemma2", False), ("gpt_neox", True)])
def test_final_norm_form_reproduces_the_norm(tiny_model_dirs, name, center):
    arch = load_model(str(tiny_model_dirs[name])).arch
    form = final_norm_form(arch)
    assert form.exact and form.center is center
    x = torch.randn(5, arch.hidden_size) * 3
    z = x - x.mean(1, keepdim=True) if center else x
    z = z / z.pow(2).mean(1, keepdim=True).sqrt()
    torch.testing.assert_close(arch.final_norm(x), form.gain * z + form.bias, atol=1e-4, rtol=1e-4)


class _Block(nn.Module):
    def __init__(self, attention_name: str):
        super().__init__()
        attention = nn.Module()
        attention.o_proj = nn.Linear(8, 8)
        setattr(self, attention_name, attention)
        self.mlp = nn.Linear(8, 8)


class _CustomLM(nn.Module):
    """A home-made causal LM with a config, embeddings and blocks, whose parts may sit under unknown names."""

    def __init__(self, attention_name: str = "self_attn", norm_name: str = "norm"):
        super().__init__()
        self.config = type("Config", (), {"num_hidden_layers": 2, "num_attention_heads": 2, "hidden_size": 8})()
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(10, 8)
        self.model.layers = nn.ModuleList([_Block(attention_name), _Block(attention_name)])
        setattr(self.model, norm_name, nn.LayerNorm(8))
        self.lm_head = nn.Linear(8, 10, bias=False)

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head


def test_a_custom_lm_with_known_part_names_is_discovered():
    arch = discover_architecture(_CustomLM())
    assert arch.layers_path == "model.layers" and isinstance(arch.final_norm, nn.LayerNorm)
    assert (arch.n_heads, arch.head_dim, arch.readout.scale, arch.readout.softcap) == (2, 4, 1.0, None)


@pytest.mark.parametrize("model, missing", [
    (_CustomLM(attention_name="token_mixer"), r"cannot find the attention module in model\.layers\[0\]"),
    (_CustomLM(norm_name="last_norm"), r"cannot find the final norm \(looked for model\.norm"),
])
def test_a_custom_lm_with_an_unknown_part_fails_naming_the_part(model, missing):
    with pytest.raises(ArchitectureError, match=missing):
        discover_architecture(model)


class _Squash(nn.Module):
    """A final 'norm' with no gain * normalise(x) + bias form."""

    def forward(self, x):
        return torch.tanh(x)


def test_a_norm_without_the_array_form_is_recorded_inexact(tiny_gemma, tmp_path):
    readout = dataclasses.replace(tiny_gemma.arch.readout, final_norm=_Squash())
    loaded = dataclasses.replace(tiny_gemma, arch=dataclasses.replace(tiny_gemma.arch, readout=readout))
    assert not final_norm_form(loaded.arch).exact
    ds = extract(loaded, tmp_path / "s.zarr", task="sentiment", shots=1, n=4, progress=False)
    assert ds.attrs["lens_form_exact"] is False


def test_bfloat16_store_records_the_exact_norm_form(tiny_gemma_dir, tiny_gemma, tmp_path):
    loaded = load_model(str(tiny_gemma_dir), dtype="bfloat16")
    ds = extract(loaded, tmp_path / "s.zarr", task="sentiment", shots=1, n=4, progress=False)
    assert ds.attrs["lens_form_exact"] is True and ds.attrs["lens_center"] is False
    unembed, lens_unembed = ds["unembed"].values, ds["lens_unembed"].values
    gain = lens_unembed[0] / unembed[0]
    # Gemma's RMS norm multiplies by (1 + w), w as stored in bfloat16 ...
    one_plus_w = 1 + loaded.arch.final_norm.weight.detach().float().numpy()
    np.testing.assert_allclose(gain, one_plus_w, rtol=1e-5)
    # ... which is the float32 model's gain up to bfloat16 rounding of w.
    np.testing.assert_allclose(gain, final_norm_form(tiny_gemma.arch).gain.numpy(), atol=1e-2)
    assert np.abs(gain - 1).max() > 0.1  # the fixture's norm gains are far from 1


@pytest.mark.real_model
def test_real_model_in_bfloat16_has_an_exact_norm_form():
    form = final_norm_form(load_model(dtype="bfloat16").arch)
    assert form.exact and not form.center
