import pytest
import torch
from torch import nn

from extraction.architecture import discover_architecture, final_norm_form
from extraction.errors import ArchitectureError
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


@pytest.mark.parametrize("name, center", [("gemma3", False), ("gpt2", True)])
def test_final_norm_form_reproduces_the_norm(tiny_model_dirs, name, center):
    arch = load_model(str(tiny_model_dirs[name])).arch
    form = final_norm_form(arch)
    assert form.exact and form.center is center
    x = torch.randn(5, arch.hidden_size) * 3
    z = x - x.mean(1, keepdim=True) if center else x
    z = z / z.pow(2).mean(1, keepdim=True).sqrt()
    torch.testing.assert_close(arch.final_norm(x), form.gain * z + form.bias, atol=1e-4, rtol=1e-4)
