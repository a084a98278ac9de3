"""The certified-shortlist logit lens gives the exact whole-vocabulary top-1 token and the read-out's label logits."""

import pytest
import torch

import extraction.lens as lens
from extraction.lens import logit_lens, shortlist_applies, shortlist_top
from extraction.models import load_model


@pytest.fixture(scope="module", params=["gemma3", "llama", "gpt2", "gemma2", "gpt_neox"])
def loaded(request, tiny_model_dirs):
    return load_model(str(tiny_model_dirs[request.param]))


def states_of(loaded, rows: int = 40, seed: int = 0) -> torch.Tensor:
    """Residual-stream-like states of very different scales (flat and peaked logit rows)."""
    generator = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-3, 2, rows)[:, None]
    return torch.randn(rows, loaded.arch.hidden_size, generator=generator) * scales


def exact_top(loaded, states: torch.Tensor) -> torch.Tensor:
    """Top-1 of the LM head's raw output: the read-out's order, without ties where soft-capping saturates."""
    readout = loaded.arch.readout
    return readout.project(readout.normalise(states)).argmax(dim=-1)


@torch.no_grad()
def test_shortlist_top_is_the_exact_argmax(loaded, monkeypatch):
    readout = loaded.arch.readout
    assert shortlist_applies(readout)
    states = states_of(loaded)
    normed = readout.normalise(states)
    unsure = []
    exact = lens._exact_top
    monkeypatch.setattr(lens, "_exact_top", lambda rows, r: unsure.append(len(rows)) or exact(rows, r))
    assert torch.equal(shortlist_top(readout, normed), exact_top(loaded, states))
    assert sum(unsure) < len(states) // 2  # most rows are certified by the bfloat16 pass alone


@torch.no_grad()
def test_rows_that_cannot_be_certified_fall_back_to_the_exact_argmax(loaded, monkeypatch):
    monkeypatch.setattr(lens, "SAFETY", 1e12)  # nothing is certified: every row takes the exact path
    states = states_of(loaded, seed=1)
    readout = loaded.arch.readout
    assert torch.equal(shortlist_top(readout, readout.normalise(states)), exact_top(loaded, states))


@torch.no_grad()
def test_logit_lens_matches_the_full_readout(loaded):
    states = states_of(loaded, rows=2 * 5).reshape(2, 5, -1)
    labels = [5, 9, 3]
    result = logit_lens(loaded, states, labels)
    logits = loaded.arch.readout(states.reshape(10, -1))  # soft-capped for Gemma 2: the stored values are too
    assert (result.top_token.reshape(-1) == exact_top(loaded, states.reshape(10, -1)).numpy()).all()
    torch.testing.assert_close(torch.from_numpy(result.label_logits).reshape(10, 3), logits[:, labels],
                               atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_a_weight_changed_in_place_is_copied_again(tiny_model_dirs):
    loaded = load_model(str(tiny_model_dirs["llama"]))
    readout = loaded.arch.readout
    state = states_of(loaded, rows=1, seed=2) * 1e4
    normed = readout.normalise(state)
    logits = readout(state)[0]
    top, bottom = int(logits.argmax()), int(logits.argmin())
    assert logits[top] > 0 and int(shortlist_top(readout, normed)) == top  # the bf16 copy is made here
    weight = readout.unembedding.weight
    weight[bottom] = 3 * weight[top]  # the least likely token becomes the most likely one
    assert int(shortlist_top(readout, normed)) == bottom == int(exact_top(loaded, state))
