"""The certified-shortlist logit lens gives the exact whole-vocabulary top-1 token and label logits."""

import pytest
import torch

import extraction.lens as lens
from extraction.architecture import unembed
from extraction.lens import logit_lens, shortlist_applies, shortlist_top
from extraction.models import load_model


@pytest.fixture(scope="module", params=["gemma3", "llama", "gpt2"])
def loaded(request, tiny_model_dirs):
    return load_model(str(tiny_model_dirs[request.param]))


def states_of(loaded, rows: int = 40, seed: int = 0) -> torch.Tensor:
    """Residual-stream-like states of very different scales (flat and peaked logit rows)."""
    generator = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-3, 2, rows)[:, None]
    return torch.randn(rows, loaded.arch.hidden_size, generator=generator) * scales


def exact_top(loaded, states: torch.Tensor) -> torch.Tensor:
    return unembed(loaded.arch, states).argmax(dim=-1)


@torch.no_grad()
def test_shortlist_top_is_the_exact_argmax(loaded, monkeypatch):
    assert shortlist_applies(loaded.arch)
    states = states_of(loaded)
    normed = loaded.arch.final_norm(states)
    unsure = []
    exact = lens._exact_top
    monkeypatch.setattr(lens, "_exact_top", lambda rows, arch: unsure.append(len(rows)) or exact(rows, arch))
    assert torch.equal(shortlist_top(loaded.arch, normed), exact_top(loaded, states))
    assert sum(unsure) < len(states) // 2  # most rows are certified by the bfloat16 pass alone


@torch.no_grad()
def test_rows_that_cannot_be_certified_fall_back_to_the_exact_argmax(loaded, monkeypatch):
    monkeypatch.setattr(lens, "SAFETY", 1e12)  # nothing is certified: every row takes the exact path
    states = states_of(loaded, seed=1)
    assert torch.equal(shortlist_top(loaded.arch, loaded.arch.final_norm(states)), exact_top(loaded, states))


@torch.no_grad()
def test_logit_lens_matches_the_full_unembedding(loaded):
    states = states_of(loaded, rows=2 * 5).reshape(2, 5, -1)
    labels = [5, 9, 3]
    result = logit_lens(loaded, states, labels)
    logits = unembed(loaded.arch, states.reshape(10, -1))
    assert (result.top_token.reshape(-1) == logits.argmax(-1).numpy()).all()
    torch.testing.assert_close(torch.from_numpy(result.label_logits).reshape(10, 3), logits[:, labels],
                               atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_a_weight_changed_in_place_is_copied_again(tiny_model_dirs):
    loaded = load_model(str(tiny_model_dirs["llama"]))
    state = states_of(loaded, rows=1, seed=2) * 1e4
    normed = loaded.arch.final_norm(state)
    logits = unembed(loaded.arch, state)[0]
    top, bottom = int(logits.argmax()), int(logits.argmin())
    assert logits[top] > 0 and int(shortlist_top(loaded.arch, normed)) == top  # the bf16 copy is made here
    weight = loaded.arch.unembedding.weight
    weight[bottom] = 3 * weight[top]  # the least likely token becomes the most likely one
    assert int(shortlist_top(loaded.arch, normed)) == bottom == int(exact_top(loaded, state))
