import numpy as np
import pytest
import torch

from heads import scores as scores_module
from heads.errors import HeadsError
from heads.scores import (SCORES, label_attention, previous_token_sums, random_repeated_tokens,
                          repeated_sequence_scores, score)


def test_previous_token_sums_ignore_left_padding():
    # one layer, two heads, T = 5; row 1 has two pad tokens on the left
    T = 5
    previous = torch.zeros(T, T)
    previous[0, 0] = 1
    previous[torch.arange(1, T), torch.arange(T - 1)] = 1  # head 0: always the previous token
    uniform = torch.tril(torch.ones(T, T))
    uniform = uniform / uniform.sum(-1, keepdim=True)  # head 1: uniform over the past
    attention = torch.stack([previous, uniform])[None, None].repeat(2, 1, 1, 1, 1)  # (B=2, L=1, H=2, T, T)
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    sums, counts = previous_token_sums(attention, mask)
    assert counts.tolist() == [4, 2]
    assert sums[:, 0, 0].tolist() == [4, 2]  # a perfect previous-token head scores 1 per counted position
    assert 0 < sums[0, 0, 1] / counts[0] < 1


def test_label_attention_sums_the_last_row_at_label_positions():
    attention = torch.zeros(1, 1, 1, 6, 6)
    attention[0, 0, 0, -1] = torch.tensor([0.1, 0.2, 0.0, 0.3, 0.0, 0.4])
    assert label_attention(attention, [[1, 3]]).item() == pytest.approx(0.5)


def test_detectors_on_ideal_patterns():
    R = 4
    S = 2 * R + 1
    def pattern(offset):
        a = torch.zeros(S, S)
        for p in range(S):
            a[p, max(p - offset, 0)] = 1
        return a
    attention = torch.stack([pattern(1), pattern(R - 1), pattern(R)])[None, None]  # heads: prev, induction, dup
    values = repeated_sequence_scores(attention, R)
    assert values["previous_token"][0, 0].tolist() == [1, 0, 0]
    assert values["induction"][0, 0].tolist() == [0, 1, 0]
    assert values["duplicate_token"][0, 0].tolist() == [0, 0, 1]


def test_random_sequences_repeat_and_avoid_special_tokens(tiny_gemma):
    tokenizer = tiny_gemma.tokenizer
    tokens = random_repeated_tokens(tokenizer, tiny_gemma.arch.vocab_size, 3, 5, seed=0)
    assert tokens.shape == (3, 11) and (tokens[:, 0] == tokenizer.bos_token_id).all()
    assert (tokens[:, 1:6] == tokens[:, 6:]).all()
    assert not set(tokens[:, 1:].ravel().tolist()) & set(tokenizer.all_special_ids)
    assert torch.equal(tokens, random_repeated_tokens(tokenizer, tiny_gemma.arch.vocab_size, 3, 5, seed=0))


def test_scores_have_layer_head_dims_and_bounded_values(tiny):
    arch = tiny.arch
    before = tiny.model.config._attn_implementation
    result = score(tiny, shots=3, n=6, n_random=4, repeat=6, progress=False)
    assert tiny.model.config._attn_implementation == before  # the fast kernel is back
    assert set(SCORES) <= set(result.data_vars)
    for name in SCORES:
        assert result[name].dims == ("layer", "head")
        assert result[name].shape == (arch.n_layers, arch.n_heads)
        assert ((result[name] >= 0) & (result[name] <= 1 + 1e-5)).all()
    assert float(result["ih"].max()) > 0


def test_scores_do_not_depend_on_batching(tiny_gemma):
    one = score(tiny_gemma, shots=3, n=5, n_random=2, repeat=5, batch_size=1, progress=False)
    many = score(tiny_gemma, shots=3, n=5, n_random=2, repeat=5, batch_size=3, progress=False)
    for name in SCORES:
        np.testing.assert_allclose(one[name].values, many[name].values, atol=1e-6)


def test_scores_are_saved_and_reused(tiny_gemma, tmp_path, monkeypatch):
    store = tmp_path / "s.zarr"
    first = score(tiny_gemma, shots=2, n=4, n_random=2, repeat=5, store=store, progress=False)

    def fail(*args, **kwargs):
        raise AssertionError("scores were recomputed")

    monkeypatch.setattr(scores_module, "attention_patterns", fail)
    again = score(tiny_gemma, shots=2, n=4, n_random=2, repeat=5, store=store, progress=False)
    np.testing.assert_allclose(first["ih"].values, again["ih"].values)
    with pytest.raises(HeadsError, match="another configuration"):
        score(tiny_gemma, shots=2, n=5, n_random=2, repeat=5, store=store, progress=False)
    monkeypatch.undo()
    replaced = score(tiny_gemma, shots=2, n=5, n_random=2, repeat=5, store=store, overwrite=True, progress=False)
    assert replaced.attrs["config"]["n"] == 5


def test_score_argument_errors(tiny_gemma):
    with pytest.raises(HeadsError, match="unknown prompt option"):
        score(tiny_gemma, n=2, progress=False, templat="x")
    with pytest.raises(HeadsError, match="repeat >= 2"):
        score(tiny_gemma, n=2, repeat=1, progress=False)
