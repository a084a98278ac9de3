import copy
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from extraction.capture import forward_last, run_with_capture
from extraction.extractor import extract
from extraction.errors import InterventionError
from extraction.interventions import HeadAblation, Injection
from heads.interventions import ablate, inject

TEXTS = ["the film was a delight Sentiment :", "dull and far too long Sentiment :", "great"]


def encode(loaded):
    batch = loaded.tokenizer(TEXTS, return_tensors="pt", padding=True)
    return batch["input_ids"], batch["attention_mask"]


def zero_input_columns(projection, heads, head_dim):
    """A copy of an output projection with the input columns of ``heads`` zeroed.

    nn.Linear stores its weight as (out, in), GPT-2's Conv1D as (in, out)."""
    edited = copy.deepcopy(projection)
    with torch.no_grad():
        for head in heads:
            columns = slice(head * head_dim, (head + 1) * head_dim)
            if hasattr(edited, "nf"):  # GPT-2 Conv1D stores (in, out)
                edited.weight[columns, :] = 0
            else:
                edited.weight[:, columns] = 0
    return edited


@contextmanager
def swapped_projections(arch, modules: dict):
    """Put ``modules[layer]`` in place of each layer's output projection, restoring the originals afterwards."""
    names = {}
    for layer, module in modules.items():
        attention = arch.attentions[layer]
        names[layer] = next(n for n, c in attention.named_children() if c is arch.output_projections[layer])
        setattr(attention, names[layer], module)
    try:
        yield
    finally:
        for layer, name in names.items():
            setattr(arch.attentions[layer], name, arch.output_projections[layer])


@pytest.mark.parametrize("heads", [[(0, 1)], [(1, 0), (1, 3), (2, 2)]])
def test_ablation_equals_zeroed_projection_columns(tiny, heads):
    arch = tiny.arch
    ids, mask = encode(tiny)
    clean = forward_last(tiny.model, ids, mask)
    with ablate(tiny, heads):
        hooked = forward_last(tiny.model, ids, mask)
    edited = {layer: zero_input_columns(arch.output_projections[layer], [h for l, h in heads if l == layer],
                                        arch.head_dim) for layer in {l for l, _ in heads}}
    with swapped_projections(arch, edited):
        by_hand = forward_last(tiny.model, ids, mask)
    torch.testing.assert_close(hooked, by_hand, atol=1e-5, rtol=1e-5)
    assert (hooked - clean).abs().max() > 1e-4  # the ablation did something
    torch.testing.assert_close(forward_last(tiny.model, ids, mask), clean)  # and is gone


def test_gqa_model_has_head_dim_unlike_hidden_over_heads(tiny_models):
    arch = tiny_models["gemma3"].arch
    assert arch.n_kv_heads < arch.n_heads and arch.head_dim != arch.hidden_size // arch.n_heads


def test_mean_ablation_equals_projection_with_folded_means(tiny_models):
    loaded = tiny_models["llama"]
    arch = loaded.arch
    ids, mask = encode(loaded)
    means = torch.randn(arch.n_layers, arch.n_heads, arch.head_dim)
    with ablate(loaded, [(1, 2)], mode="mean", means=means):
        hooked = forward_last(loaded.model, ids, mask)
    original = arch.output_projections[1]
    columns = slice(2 * arch.head_dim, 3 * arch.head_dim)
    edited = torch.nn.Linear(original.in_features, original.out_features, bias=True)
    with torch.no_grad():
        edited.weight.copy_(original.weight)
        edited.weight[:, columns] = 0
        edited.bias.copy_(original.weight[:, columns] @ means[1, 2])
    with swapped_projections(arch, {1: edited}):
        by_hand = forward_last(loaded.model, ids, mask)
    torch.testing.assert_close(hooked, by_hand, atol=1e-5, rtol=1e-5)


class Boom(Exception):
    pass


def hook_counts(arch):
    return sum(len(p._forward_pre_hooks) for p in arch.output_projections) + sum(
        len(layer._forward_pre_hooks) + len(layer._forward_hooks) for layer in arch.layers)


def test_hooks_are_removed_even_when_the_block_raises(tiny_gemma):
    arch = tiny_gemma.arch
    before = hook_counts(arch)
    with pytest.raises(Boom):
        with ablate(tiny_gemma, [(0, 0), (3, 3)]):
            assert hook_counts(arch) == before + 2
            raise Boom
    with pytest.raises(Boom):
        with inject(tiny_gemma, torch.ones(arch.hidden_size), 2):
            assert hook_counts(arch) == before + 1
            raise Boom
    assert hook_counts(arch) == before


@pytest.mark.parametrize("heads, message", [
    ([], "empty"),
    ([(4, 0)], "block 4 is out of range 0..3"),
    ([(0, 4)], "head 4 is out of range 0..3"),
    ([(-1, 0)], "block -1 is out of range"),
    (["x"], "pair of ints"),
])
def test_bad_head_sets_are_clear_errors(tiny_gemma, heads, message):
    with pytest.raises(InterventionError, match=message):
        with ablate(tiny_gemma, heads):
            pass


def test_bad_modes_and_means(tiny_gemma):
    with pytest.raises(InterventionError, match="unknown ablation mode 'half'"):
        with ablate(tiny_gemma, [(0, 0)], mode="half"):
            pass
    with pytest.raises(InterventionError, match="needs means of shape"):
        with ablate(tiny_gemma, [(0, 0)], mode="mean"):
            pass


def test_bad_injections(tiny_gemma):
    hidden = tiny_gemma.arch.hidden_size
    with pytest.raises(InterventionError, match="layer 5 is out of range: residual states are 0..4"):
        with inject(tiny_gemma, torch.zeros(hidden), 5):
            pass
    with pytest.raises(InterventionError, match=r"shape \(3,\); the residual stream needs \(64,\)"):
        with inject(tiny_gemma, torch.zeros(3), 1):
            pass
    with pytest.raises(InterventionError, match="position must be"):
        with inject(tiny_gemma, torch.zeros(hidden), 1, position="first"):
            pass


def test_injection_at_the_final_state_shifts_logits_exactly(tiny):
    arch = tiny.arch
    ids, mask = encode(tiny)
    vector = torch.randn(arch.hidden_size, generator=torch.Generator().manual_seed(0))
    states, _ = run_with_capture(tiny, ids, mask)
    with inject(tiny, vector, arch.n_layers):
        injected = forward_last(tiny.model, ids, mask)
    expected = arch.readout(states[:, -1] + vector)
    torch.testing.assert_close(injected, expected, atol=1e-4, rtol=1e-4)


def test_injected_group_differs_from_clean_by_the_vector_at_that_state_only(tiny_gemma, tmp_path):
    arch = tiny_gemma.arch
    store = tmp_path / "s.zarr"
    vector = torch.randn(arch.hidden_size, generator=torch.Generator().manual_seed(1))
    clean = extract(tiny_gemma, store, shots=0, n=6, progress=False)
    injected = extract(tiny_gemma, store, shots=0, n=6, setting="inject", intervention=Injection(vector, 2),
                       progress=False)
    difference = injected["hidden"].values - clean["hidden"].values
    np.testing.assert_allclose(difference[:, :2], 0, atol=1e-6)
    np.testing.assert_allclose(difference[:, 2], np.broadcast_to(vector.numpy(), difference[:, 2].shape), atol=1e-5)
    assert np.abs(difference[:, 3:]).max() > 1e-3
    record = injected.attrs["intervention"][0]
    assert record["kind"] == "injection" and record["layer"] == 2


def test_injection_at_state_zero_and_at_a_fixed_position(tiny_gemma):
    arch = tiny_gemma.arch
    ids, mask = encode(tiny_gemma)
    vector = torch.randn(arch.hidden_size)
    clean = forward_last(tiny_gemma.model, ids, mask)
    with inject(tiny_gemma, vector, 0):
        at_zero = forward_last(tiny_gemma.model, ids, mask)
    with inject(tiny_gemma, vector, 0, position=-1):
        at_minus_one = forward_last(tiny_gemma.model, ids, mask)
    torch.testing.assert_close(at_zero, at_minus_one)
    assert (at_zero - clean).abs().max() > 1e-4


def test_ablation_works_on_a_bare_hugging_face_model(tiny_models):
    loaded = tiny_models["gpt2"]
    ids, mask = encode(loaded)
    with ablate(loaded, [(0, 0)]):
        expected = forward_last(loaded.model, ids, mask)
    with ablate(loaded.model, [(0, 0)]) as info:
        got = forward_last(loaded.model, ids, mask)
    torch.testing.assert_close(got, expected)
    assert info == HeadAblation([(0, 0)]).describe() == {"kind": "head_ablation", "heads": [[0, 0]], "mode": "zero",
                                                        "data": {}, "origin": None}


def test_objects_are_exported_from_heads_and_refuse_mistakes_early():
    import heads

    assert heads.HeadAblation is HeadAblation and heads.Injection is Injection
    with pytest.raises(InterventionError, match="means are used only by mode='mean'"):
        HeadAblation([(0, 0)], means=torch.zeros(4, 4, 24))
    with pytest.raises(InterventionError, match="origin must be a JSON-ready dict"):
        HeadAblation([(0, 0)], origin={"vector": torch.zeros(2)})
    with pytest.raises(InterventionError, match="injection layer must be an int"):
        Injection(torch.zeros(3), 1.5)


def test_an_injection_keeps_its_own_copy_of_the_vector(tiny_gemma):
    vector = torch.ones(tiny_gemma.arch.hidden_size)
    injection = Injection(vector, 1, origin={"vector": "ones"})
    record = injection.describe()
    vector.zero_()
    assert injection.describe() == record and record["vector_norm"] == pytest.approx(8.0)
    assert record["origin"] == {"vector": "ones"} and record["data"]["vector"]["shape"] == [64]
