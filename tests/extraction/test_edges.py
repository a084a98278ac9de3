"""Edge knockout equals a hand reference from eager attention weights, on tiny models of several architectures.

Reference for block b: the attention module's inputs are recorded in a clean run; called on them, the eager module
returns its weights A (B, H, T, T), and called with a mask that keeps only the diagonal, it writes each position's
own value vectors into its output projection's input. The knocked-out heads' output is then A with the edge's
pairs removed and the rows renormalised, times those values; it must equal what the output projection receives in
the knocked-out run (eager and SDPA).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from extraction.edges import EDGE_TYPES, EdgeKnockout, edge_pairs
from extraction.errors import InterventionError
from extraction.interventions import Batch
from extraction.models import load_model
from extraction.prompts import build_prompts, encode
from extraction.tasks import load_task
from heads.scores import attention_implementation, eager_attention

ARCHITECTURES = ["llama", "gemma2", "gemma3", "gpt2", "qwen2", "mistral"]
SHOTS = 3


@pytest.fixture(scope="module", params=ARCHITECTURES)
def loaded(request, tiny_model_dirs):
    return load_model(str(tiny_model_dirs[request.param]), attn_implementation="eager")


@pytest.fixture(scope="module")
def batch(loaded):
    prompts = build_prompts(load_task("sentiment"), shots=SHOTS, n=3, seed=2)
    encoded = encode(loaded.tokenizer, prompts.prompts)
    return Batch(encoded.input_ids, encoded.attention_mask, encoded.groups)


def _attention(loaded, implementation: str):
    """A context switching the model to ``implementation``; skips the test where transformers has no such path."""
    if implementation == "sdpa" and loaded.model.config.model_type == "gemma2":
        pytest.skip("Gemma 2's soft-capped attention has no SDPA path in transformers")
    return attention_implementation(loaded.model, implementation)


def _record(loaded, block, batch, *contexts):
    """The attention module's (args, kwargs) and the output projection's input at ``block`` in one forward pass."""
    seen = {}
    arch = loaded.arch

    def keep_call(module, args, kwargs):
        seen.setdefault("call", (args, kwargs))

    def keep_heads(module, args):
        seen["heads"] = args[0].detach().clone()

    handles = [arch.attentions[block].register_forward_pre_hook(keep_call, with_kwargs=True),
               arch.output_projections[block].register_forward_pre_hook(keep_heads)]
    try:
        with torch.no_grad():
            from contextlib import ExitStack
            with ExitStack() as stack:
                for context in contexts:
                    stack.enter_context(context)
                loaded.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return seen


@torch.no_grad()
def _weights_and_values(loaded, block, args, kwargs, hidden):
    """Eager weights (B, H, T, T) and per-head values (B, H, T, hd) of ``block``'s attention on input ``hidden``."""
    arch = loaded.arch
    attention = arch.attentions[block]
    call_args = (hidden, *args[1:]) if args else args
    call_kwargs = kwargs if args else {**kwargs, "hidden_states": hidden}
    weights = attention(*call_args, **call_kwargs)[1]
    length = weights.shape[-1]
    diagonal = torch.full((length, length), torch.finfo(weights.dtype).min).fill_diagonal_(0)[None, None]
    values = {}
    handle = arch.output_projections[block].register_forward_pre_hook(
        lambda module, a: values.setdefault("v", a[0].clone()))
    try:
        attention(*call_args, **{**call_kwargs, "attention_mask": diagonal})
    finally:
        handle.remove()
    b, t, _ = values["v"].shape
    return weights, values["v"].view(b, t, arch.n_heads, -1).transpose(1, 2)


@torch.no_grad()
def _reference(loaded, block, batch, blocked):
    """The output projection's input at ``block`` with ``blocked`` (B, 1|H, T, T) removed from the eager weights."""
    with eager_attention(loaded.model):
        args, kwargs = _record(loaded, block, batch)["call"]
        hidden = args[0] if args else kwargs["hidden_states"]
        weights, v = _weights_and_values(loaded, block, args, kwargs, hidden)  # v: (B, H, T, hd)
    kept = weights.masked_fill(blocked, 0.0)
    kept = kept / kept.sum(-1, keepdim=True)
    b, _, t, _ = v.shape
    return (kept @ v).transpose(1, 2).reshape(b, t, -1), weights


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("edge", ["y->x", "y->final", "x->y"])
def test_knockout_equals_the_hand_reference(loaded, batch, edge, implementation):
    switched = _attention(loaded, implementation)
    block = 0
    pairs = edge_pairs(EDGE_TYPES[edge], batch.groups)
    expected, weights = _reference(loaded, block, batch, pairs[:, None])
    assert weights.masked_select(pairs[:, None].expand_as(weights)).sum() > 0  # the edge carried weight
    with switched:
        got = _record(loaded, block, batch, EdgeKnockout(edge, blocks=[block]).applied(loaded, batch))["heads"]
        clean = _record(loaded, block, batch)["heads"]
    real = batch.attention_mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=2e-5, rtol=1e-4)
    assert (got[real] - clean[real]).abs().max() > 1e-4


def test_chosen_heads_change_only_those_heads(loaded, batch):
    block, heads = loaded.arch.n_layers - 1, [1]
    pairs = edge_pairs(EDGE_TYPES["y->final"], batch.groups)
    chosen = torch.zeros(loaded.arch.n_heads, dtype=torch.bool)
    chosen[heads] = True
    expected, _ = _reference(loaded, block, batch, pairs[:, None] & chosen[None, :, None, None])
    got = _record(loaded, block, batch, EdgeKnockout("y->final", [block], heads).applied(loaded, batch))["heads"]
    real = batch.attention_mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=2e-5, rtol=1e-4)


def test_bad_input_is_one_clear_error(loaded, batch):
    with pytest.raises(InterventionError, match="unknown edge type 'y->z'; use one of"):
        EdgeKnockout("y->z", [0])
    with pytest.raises(InterventionError, match="outside the model's blocks"):
        with EdgeKnockout("y->x", [0, loaded.arch.n_layers]).applied(loaded, batch):
            pass
    with pytest.raises(InterventionError, match="needs the prompts' position groups"):
        with EdgeKnockout("y->x", [0]).applied(loaded):
            pass
    one_shot = encode(loaded.tokenizer, build_prompts(load_task("sentiment"), shots=1, n=2).prompts)
    with pytest.raises(InterventionError, match="connects no positions"):
        with EdgeKnockout("y->x", [0]).applied(loaded, Batch(one_shot.input_ids, one_shot.attention_mask,
                                                             one_shot.groups)):
            pass


def test_a_knockout_group_extracts_records_and_measures(tiny_gemma, tmp_path):
    """A knocked-out re-extraction is a store group like any other: recorded exactly, rebuilt, measured."""
    from extraction.extractor import extract
    from extraction.interventions import recorded_interventions
    from extraction.store import open_group
    from geometry.sweep import measure

    store = tmp_path / "s.zarr"
    common = dict(task="sentiment", shots=3, n=12, batch_size=4, progress=False)
    clean = extract(tiny_gemma, store, **common)
    knockout = EdgeKnockout("y->final", blocks=[2, 3], origin={"scan": "test"})
    ds = extract(tiny_gemma, store, setting="ko_y->final_2-3", intervention=knockout, **common)
    (record,) = ds.attrs["intervention"]
    assert record["kind"] == "edge_knockout" and record["edge"] == "y->final" and record["blocks"] == [2, 3]
    (rebuilt,) = recorded_interventions(open_group(store, "ko_y->final_2-3"))
    assert rebuilt.describe() == knockout.describe()
    # states below the window are untouched, states after it change
    np.testing.assert_allclose(ds["hidden"][:, :3].values, clean["hidden"][:, :3].values, atol=1e-5)
    assert np.abs(ds["hidden"][:, 4].values - clean["hidden"][:, 4].values).max() > 1e-4
    measured = measure(store, "ko_y->final_2-3", n_boot=5, progress=False, parallel="serial")
    assert measured["value"].sizes["layer"] == tiny_gemma.arch.n_states
    assert np.isfinite(measured["value"].sel(layer=4).values).any()


# --- counterfactual patching -----------------------------------------------------------------------------------------


def _donor(loaded, base, seed=7):
    prompts = build_prompts(load_task("sentiment"), shots=SHOTS, n=base.input_ids.shape[0], seed=seed)
    encoded = encode(loaded.tokenizer, prompts.prompts)
    return Batch(encoded.input_ids, encoded.attention_mask, encoded.groups)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_patching_from_the_base_itself_changes_nothing(loaded, batch, implementation):
    from extraction.edges import patched_edge

    switched = _attention(loaded, implementation)
    with switched:
        with torch.no_grad():
            clean = loaded.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            with patched_edge(loaded, "y->x", range(loaded.arch.n_layers), batch, batch):
                same = loaded.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    real = batch.attention_mask.bool()
    torch.testing.assert_close(same[real], clean[real], atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def prompt_set():
    task = load_task("sentiment")
    return task, build_prompts(task, shots=SHOTS, n=3, seed=2)


def _prompt_batch(loaded, prompts):
    encoded = encode(loaded.tokenizer, list(prompts))
    return Batch(encoded.input_ids, encoded.attention_mask, encoded.groups, tuple(prompts))


def _block_input(loaded, block, batch):
    args, kwargs = _record(loaded, block, batch)["call"]
    return args, kwargs, (args[0] if args else kwargs["hidden_states"])


@torch.no_grad()
def _patch_reference(loaded, block, base, donor, pairs, heads):
    """What ``block``'s output projection reads when receiver q takes the keys and values of its senders from the
    donor: per row and per distinct sender set S, the eager module runs on the base input with the rows of S
    replaced by the donor's inputs at the aligned positions (the base positions' rotary angles are kept), and each
    receiver with that set takes its row of those eager weights times those values; the other positions, and the
    heads not chosen, take the base run's weights times values."""
    from extraction.edges import aligned_positions

    with eager_attention(loaded.model):
        args, kwargs, base_hidden = _block_input(loaded, block, base)
        _, _, donor_hidden = _block_input(loaded, block, donor)
        w_base, v_base = _weights_and_values(loaded, block, args, kwargs, base_hidden)
        expected = w_base @ v_base  # (B, H, T, hd)
        chosen = range(loaded.arch.n_heads) if heads is None else heads
        for row in range(pairs.shape[0]):
            sets = {}
            for receiver in torch.nonzero(pairs[row].any(1)).flatten().tolist():
                sets.setdefault(tuple(torch.nonzero(pairs[row, receiver]).flatten().tolist()), []).append(receiver)
            for senders, receivers in sets.items():
                substituted = base_hidden.clone()
                substituted[row, list(senders)] = donor_hidden[
                    row, aligned_positions(base.groups, donor.groups, row, senders)]
                w, v = _weights_and_values(loaded, block, args, kwargs, substituted)
                for head in chosen:
                    expected[row, head, receivers] = w[row, head, receivers] @ v[row, head]
    b, h, t, d = expected.shape
    return expected.transpose(1, 2).reshape(b, t, h * d)


#: (edge, donor, heads): receivers that are also senders (y->y), each donor kind, all and chosen heads.
PATCHES = [("y->y", "demos:1", None), ("x->y", "shuffled", [1]), ("y->final", "task:topic", None),
           ("query->final", "demos:3", [0, 3])]


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("edge,donor,heads", PATCHES)
def test_edge_patch_equals_the_hand_reference(loaded, prompt_set, edge, donor, heads, implementation):
    from extraction.edges import EdgePatch

    switched = _attention(loaded, implementation)
    task, prompts = prompt_set
    block = 1
    patch = EdgePatch(edge, blocks=[block], heads=heads, donor=donor)
    patch.prepare(loaded, task, prompts)
    base = _prompt_batch(loaded, prompts.prompts)
    donor_batch = _prompt_batch(loaded, patch.donors(prompts.prompts))
    pairs = edge_pairs(EDGE_TYPES[edge], base.groups)
    expected = _patch_reference(loaded, block, base, donor_batch, pairs, heads)
    with switched:
        got = _record(loaded, block, base, patch.applied(loaded, base))["heads"]
        clean = _record(loaded, block, base)["heads"]
        got = got[:, :clean.shape[1]]  # the rows of the added key entries are dropped
    real = base.attention_mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=2e-5, rtol=1e-4)
    assert (got[real] - clean[real]).abs().max() > 1e-4


def test_patching_refuses_what_cannot_be_aligned(loaded, batch):
    from extraction.edges import patched_edge

    with pytest.raises(InterventionError, match="cannot be aligned"):
        with patched_edge(loaded, "x->y", [0], batch, _donor(loaded, batch)):
            pass


def test_knockout_without_padding_under_sdpa_equals_the_reference(loaded, batch):
    """One prompt, no padding: SDPA gets no mask at all (plain causal), and the knockout builds one."""
    switched = _attention(loaded, "sdpa")
    one = Batch(batch.input_ids[:1], batch.attention_mask[:1],
                type(batch.groups)(batch.groups.kind[:1], batch.groups.demo[:1]))
    keep = one.attention_mask[0].bool()
    one = Batch(one.input_ids[:, keep], one.attention_mask[:, keep],
                type(batch.groups)(one.groups.kind[:, keep], one.groups.demo[:, keep]))
    pairs = edge_pairs(EDGE_TYPES["y->final"], one.groups)
    expected, _ = _reference(loaded, 0, one, pairs[:, None])
    with switched:
        got = _record(loaded, 0, one, EdgeKnockout("y->final", blocks=[0]).applied(loaded, one))["heads"]
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


def test_a_patch_group_extracts_records_and_rebuilds_its_donors(tiny_gemma, tmp_path):
    """A patched re-extraction is a store group like any other: its record names the donor spec, and the record with
    the group's own prompts rebuilds the same donors."""
    from extraction.edges import EdgePatch
    from extraction.extractor import extract
    from extraction.interventions import recorded_interventions
    from extraction.prompts import PromptConfig
    from extraction.store import open_group

    store = tmp_path / "s.zarr"
    common = dict(task="sentiment", shots=3, n=8, batch_size=4, progress=False)
    clean = extract(tiny_gemma, store, **common)
    patch = EdgePatch("y->final", blocks=[2, 3], donor="demos:5", origin={"test": "patch"})
    ds = extract(tiny_gemma, store, setting="patch", intervention=patch, **common)
    (record,) = ds.attrs["intervention"]
    assert record["kind"] == "edge_patch" and record["donor"] == "demos:5" and record["blocks"] == [2, 3]
    assert "other demonstrations" in record["donor_prompts"]
    (rebuilt,) = recorded_interventions(open_group(store, "patch"))
    assert rebuilt.describe() == patch.describe()
    task = load_task("sentiment")
    prompts = build_prompts(task, PromptConfig(shots=3, n=8))
    rebuilt.prepare(tiny_gemma, task, prompts)
    assert rebuilt.donors(prompts.prompts) == patch.donors(prompts.prompts)
    assert [p.query_index for p in patch.donors(prompts.prompts)] == [p.query_index for p in prompts.prompts]
    np.testing.assert_allclose(ds["hidden"][:, :3].values, clean["hidden"][:, :3].values, atol=1e-5)
    assert np.abs(ds["hidden"][:, 4].values - clean["hidden"][:, 4].values).max() > 1e-4


def test_donor_specs(prompt_set):
    from extraction.donors import DonorSpec, donor_prompts

    task, prompts = prompt_set
    assert DonorSpec.parse("shuffled").text == "shuffled:0" and DonorSpec.parse("task:topic:3").task == "topic"
    shuffled = donor_prompts(DonorSpec.parse("shuffled"), task, prompts)
    for base, donor in zip(prompts.prompts, shuffled):
        assert donor.demo_indices == base.demo_indices and donor.query_index == base.query_index
        assert sorted(donor.demo_labels) == sorted(base.demo_labels)
        # as many labels moved as the two classes allow (a random permutation often moves none)
        moved = sum(d != l for d, l in zip(donor.demo_labels, base.demo_labels))
        assert moved == 2 * min(base.demo_labels.count(0), base.demo_labels.count(1))
    other = donor_prompts(DonorSpec.parse("demos:1"), task, prompts)
    assert all(d.demo_indices != b.demo_indices and d.query_index == b.query_index
               for b, d in zip(prompts.prompts, other))
    # a prompt's donor does not depend on the other prompts of the run
    assert donor_prompts(DonorSpec.parse("demos:1"), task, prompts, prompts.prompts[1:2]) == other[1:2]
    assert "Article:" in donor_prompts(DonorSpec.parse("task:topic"), task, prompts)[0].text


def test_bad_patch_input_is_one_clear_error(loaded, prompt_set, tmp_path):
    from extraction.edges import EdgePatch
    from extraction.extractor import extract

    task, prompts = prompt_set
    for spec in ("reversed", "demos", "demos:x", "task:", "shuffled:1:2"):
        with pytest.raises(InterventionError, match=f"unknown donor {spec!r}; use shuffled, shuffled:SEED"):
            EdgePatch("y->final", [0], donor=spec)
    with pytest.raises(InterventionError, match="unknown edge type 'y->z'"):
        EdgePatch("y->z", [0])
    with pytest.raises(InterventionError, match="outside the model's blocks"):
        EdgePatch("y->x", [loaded.arch.n_layers]).check(loaded.arch)
    with pytest.raises(InterventionError, match=r"heads \[9\] are outside"):
        EdgePatch("y->x", [0], heads=[9]).check(loaded.arch)
    base = _prompt_batch(loaded, prompts.prompts)
    with pytest.raises(InterventionError, match="call prepare"):
        with EdgePatch("y->final", [0]).applied(loaded, base):
            pass
    # x_i of other demonstrations tokenize to other lengths: refused before anything is written
    with pytest.raises(InterventionError, match="group of demonstration 1 is .* cannot be aligned"):
        extract(loaded, tmp_path / "s.zarr", task="sentiment", shots=SHOTS, n=3, seed=2, progress=False,
                intervention=EdgePatch("x->y", [0], donor="demos:1"))
    assert not (tmp_path / "s.zarr").exists()
    with pytest.raises(InterventionError, match="connects no positions"):
        EdgePatch("y->y", [0]).prepare(loaded, task, build_prompts(task, shots=1, n=2))
