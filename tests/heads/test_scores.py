import dataclasses

import numpy as np
import pytest
import torch

from extraction import quantisation
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


def test_scores_have_block_head_dims_and_bounded_values(tiny):
    arch = tiny.arch
    before = tiny.model.config._attn_implementation
    result = score(tiny, shots=3, n=6, n_random=4, repeat=6, progress=False)
    assert tiny.model.config._attn_implementation == before  # the fast kernel is back
    assert set(SCORES) <= set(result.data_vars)
    for name in SCORES:
        assert result[name].dims == ("block", "head")
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

    monkeypatch.setattr(scores_module, "reduce_attention", fail)
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


@torch.no_grad()
def materialised(loaded, input_ids, attention_mask, reduce):
    """The computation before per-block reduction: every layer's weights from ``output_attentions=True``, stacked
    into (batch, layer, head, T, T) on the CPU, then reduced."""
    from extraction.capture import position_ids

    with scores_module.eager_attention(loaded.model):
        output = loaded.model(input_ids=input_ids, attention_mask=attention_mask,
                              position_ids=position_ids(attention_mask), output_attentions=True, logits_to_keep=1,
                              use_cache=False)
    return reduce(torch.stack([a.float().cpu() for a in output.attentions], dim=1))


def test_scores_equal_the_materialised_computation(tiny, monkeypatch):
    settings = dict(shots=3, n=5, n_random=3, repeat=6, batch_size=2, progress=False)
    reduced = score(tiny, **settings)
    monkeypatch.setattr(scores_module, "reduce_attention", materialised)
    reference = score(tiny, **settings)
    for name in SCORES:
        np.testing.assert_array_equal(reduced[name].values, reference[name].values)


def test_attention_patterns_are_every_blocks_weights(tiny):
    ids = torch.tensor([[0, 1, 5, 6, 7], [1, 8, 9, 10, 11]])
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    patterns = scores_module.attention_patterns(tiny, ids, mask)
    assert patterns.shape == (2, tiny.arch.n_layers, tiny.arch.n_heads, 5, 5)
    assert torch.equal(patterns, materialised(tiny, ids, mask, lambda w: w))


def test_only_one_blocks_weights_exist_at_a_time(tiny_gemma):
    import weakref

    arch, alive = tiny_gemma.arch, []
    weights: list = []

    def watch(module, args, output):  # registered first, so it runs before the reducing hook
        alive.append([ref() is not None for ref in weights])
        weights.append(weakref.ref(output[1]))

    handles = [attention.register_forward_hook(watch) for attention in arch.attentions]
    try:
        ids = torch.tensor([[1, 5, 6, 7, 8]])
        out = scores_module.reduce_attention(tiny_gemma, ids, torch.ones_like(ids), lambda w: {"sum": w.sum((-2, -1))})
    finally:
        for handle in handles:
            handle.remove()
    assert out["sum"].shape == (1, arch.n_layers, arch.n_heads)
    assert alive == [[False] * block for block in range(arch.n_layers)]  # earlier blocks' weights are already freed
    assert all(ref() is None for ref in weights)


def by_hand_pth(loaded, *, n, first_pair):
    """PTH from eager weights by explicit loops over prompts and positions (1-based k from the first real token)."""
    from heads.prompting import prompt_batches

    total, count = np.zeros((loaded.arch.n_layers, loaded.arch.n_heads)), 0
    for _, encoded in prompt_batches(loaded, shots=0, n=n, seed=0, batch_size=3).batches:
        attention = materialised(loaded, encoded.input_ids, encoded.attention_mask, lambda w: w).numpy()
        for row, mask in enumerate(encoded.attention_mask.tolist()):
            first = mask.index(1)
            for k in range(2 if first_pair else 3, len(mask) - first + 1):
                query = first + k - 1
                total += attention[row, :, :, query, query - 1]
                count += 1
    return total / count


@pytest.mark.parametrize("first_pair", [True, False])
def test_pth_first_pair_against_a_by_hand_computation(tiny_gemma, first_pair):
    result = score(tiny_gemma, shots=1, n=5, n_random=1, repeat=3, batch_size=3, progress=False,
                   **({} if first_pair else {"pth_first_pair": False}))  # the default is the paper's reading
    np.testing.assert_allclose(result["pth"].values, by_hand_pth(tiny_gemma, n=5, first_pair=first_pair),
                               rtol=1e-5, atol=1e-7)
    assert result.attrs["config"]["pth_first_pair"] is first_pair
    assert ("k>=2" if first_pair else "k>=3") in result["pth"].attrs["definition"]


def test_pth_setting_is_part_of_the_stored_configuration(tiny_gemma, tmp_path):
    store = tmp_path / "s.zarr"
    settings = dict(shots=1, n=3, n_random=1, repeat=3, store=store, progress=False)
    with_pair = score(tiny_gemma, **settings)
    with pytest.raises(HeadsError, match="another configuration"):
        score(tiny_gemma, **settings, pth_first_pair=False)
    without = score(tiny_gemma, **settings, pth_first_pair=False, overwrite=True)
    assert not np.array_equal(with_pair["pth"].values, without["pth"].values)
    np.testing.assert_array_equal(with_pair["ih"].values, without["ih"].values)


def test_head_scores_cannot_align_with_stored_states(tiny_gemma, tmp_path):
    from extraction.extractor import extract

    store = tmp_path / "s.zarr"
    states = extract(tiny_gemma, store, shots=1, n=3, progress=False)
    scores = score(tiny_gemma, shots=1, n=3, n_random=1, repeat=3, store=store, progress=False)
    assert scores["pth"].dims == ("block", "head") and "layer" in states["hidden"].dims
    assert not set(scores.dims) & set(states.dims)
    combined = scores["pth"] + states["hidden"].isel(example=0, dim=0)  # broadcasts; nothing is matched by number
    assert combined.sizes == {"block": tiny_gemma.arch.n_layers, "head": tiny_gemma.arch.n_heads,
                              "layer": tiny_gemma.arch.n_layers + 1}


def test_scores_stored_the_old_way_load_with_block_and_are_reused(tiny_gemma, tmp_path, monkeypatch):
    store = tmp_path / "s.zarr"
    settings = dict(shots=1, n=3, n_random=1, repeat=3, progress=False)
    fresh = score(tiny_gemma, **settings)
    old = fresh.rename({"block": "layer"})
    old.attrs["config"] = {k: v for k, v in fresh.attrs["config"].items() if k != "pth_first_pair"}
    old.to_zarr(str(store), group="head_scores", mode="w", consolidated=False)  # as an earlier version wrote it

    loaded = scores_module.load_scores(store)
    assert loaded["pth"].dims == ("block", "head") and loaded.attrs["config"]["pth_first_pair"] is True
    monkeypatch.setattr(scores_module, "reduce_attention", lambda *a: pytest.fail("scores were recomputed"))
    np.testing.assert_array_equal(score(tiny_gemma, **settings, store=store)["pth"].values, fresh["pth"].values)
    with pytest.raises(HeadsError, match="another configuration"):
        score(tiny_gemma, **settings, store=store, pth_first_pair=False)


def test_scores_of_an_unquantised_model_are_not_reused_for_a_quantised_one(tiny_gemma, tmp_path, monkeypatch):
    store = tmp_path / "s.zarr"
    settings = dict(shots=1, n=3, n_random=1, repeat=3, progress=False, store=store)
    score(tiny_gemma, **settings)
    four_bit = dataclasses.replace(tiny_gemma, provenance={
        **tiny_gemma.provenance, "quantization": quantisation.describe(quantisation.quantization_config("bnb-4bit"))})
    with pytest.raises(HeadsError, match="another configuration"):
        score(four_bit, **settings)
    stored = scores_module.load_scores(store)  # scores stored before the quantisation was recorded
    stored.attrs["config"] = {k: v for k, v in stored.attrs["config"].items() if k != "quantization"}
    stored.to_zarr(str(store), group="head_scores", mode="w", consolidated=False)
    monkeypatch.setattr(scores_module, "reduce_attention", lambda *a: pytest.fail("scores were recomputed"))
    score(tiny_gemma, **settings)
