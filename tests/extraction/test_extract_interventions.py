"""``extract(..., intervention=...)`` applies intervention objects itself, records them exactly, and leaves no hooks."""

import hashlib
from contextlib import ExitStack

import numpy as np
import pytest
import torch

from extraction.capture import run_with_capture
from extraction.errors import InterventionError, StoreError
from extraction.extractor import extract
from extraction.interventions import HeadAblation, Injection, recorded_interventions
from heads.interventions import ablate, inject

COMMON = dict(shots=2, n=6, batch_size=4, progress=False)
HEADS = [(1, 2), (3, 0)]


def hook_counts(arch) -> int:
    modules = [*arch.output_projections, *arch.layers, *arch.attentions]
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in modules)


def states_inside(loaded, group, *contexts) -> np.ndarray:
    """Each prompt of ``group`` run alone (no padding) inside the user's own ``with`` blocks: the reference."""
    rows = []
    for text in group["prompt"].values:
        encoded = loaded.tokenizer([str(text)], return_tensors="pt")
        with ExitStack() as stack:
            for context in contexts:
                stack.enter_context(context())
            states, _ = run_with_capture(loaded, encoded["input_ids"], encoded["attention_mask"])
        rows.append(states[0].numpy())
    return np.stack(rows)


def vector_of(arch, seed=0) -> torch.Tensor:
    return torch.randn(arch.hidden_size, generator=torch.Generator().manual_seed(seed))


def test_an_ablation_object_is_applied_without_a_with_block(tiny_gemma, tmp_path):
    store = tmp_path / "s.zarr"
    clean = extract(tiny_gemma, store, **COMMON)
    ablated = extract(tiny_gemma, store, setting="ablate", intervention=HeadAblation(HEADS), **COMMON)
    expected = states_inside(tiny_gemma, ablated, lambda: ablate(tiny_gemma, HEADS))
    np.testing.assert_allclose(ablated["hidden"].values, expected, atol=1e-5)
    difference = np.abs(ablated["hidden"].values - clean["hidden"].values)
    assert difference[:, :2].max() < 1e-6  # states 0..1 come before block 1, the first ablated one
    assert difference[:, 2:].max() > 1e-3


def test_mean_ablation_records_and_stores_the_means_used(tiny_gemma, tmp_path):
    arch = tiny_gemma.arch
    means = torch.randn(arch.n_layers, arch.n_heads, arch.head_dim, generator=torch.Generator().manual_seed(2))
    ablation = HeadAblation(HEADS, mode="mean", means=means, origin={"set": "mine"})
    group = extract(tiny_gemma, tmp_path / "s.zarr", setting="mean", intervention=ablation, **COMMON)
    expected = states_inside(tiny_gemma, group, lambda: ablate(tiny_gemma, HEADS, mode="mean", means=means))
    np.testing.assert_allclose(group["hidden"].values, expected, atol=1e-5)
    record = group.attrs["intervention"]
    assert record == group.attrs["config"]["intervention"] == [ablation.describe()]
    assert record[0]["kind"] == "head_ablation" and record[0]["mode"] == "mean"
    assert record[0]["origin"] == {"set": "mine"}
    assert record[0]["heads"] == [[1, 2], [3, 0]]
    stored = group["intervention0_means"].values
    np.testing.assert_array_equal(stored, means.numpy())
    assert record[0]["data"]["means"]["sha256"] == hashlib.sha256(stored.astype(np.float32).tobytes()).hexdigest()


def test_an_injection_object_equals_the_context_manager_and_stores_its_vector(tiny_gemma, tmp_path):
    arch = tiny_gemma.arch
    vector = vector_of(arch)
    injection = Injection(vector, 2, scale=0.5)
    group = extract(tiny_gemma, tmp_path / "s.zarr", setting="inject", intervention=injection, **COMMON)
    expected = states_inside(tiny_gemma, group, lambda: inject(tiny_gemma, vector, 2, scale=0.5))
    np.testing.assert_allclose(group["hidden"].values, expected, atol=1e-5)
    np.testing.assert_array_equal(group["intervention0_vector"].values, vector.numpy())
    record = group.attrs["intervention"][0]
    assert record["kind"] == "injection" and record["layer"] == 2 and record["scale"] == 0.5
    assert record["position"] == "last" and record["vector_norm"] == pytest.approx(float(vector.norm()))
    assert record["data"]["vector"]["sha256"] == hashlib.sha256(vector.numpy().tobytes()).hexdigest()


def test_two_interventions_compose(tiny_gemma, tmp_path):
    vector = vector_of(tiny_gemma.arch, seed=3)
    both = [HeadAblation(HEADS), Injection(vector, 3)]
    group = extract(tiny_gemma, tmp_path / "s.zarr", setting="both", intervention=both, **COMMON)
    expected = states_inside(tiny_gemma, group, lambda: ablate(tiny_gemma, HEADS),
                             lambda: inject(tiny_gemma, vector, 3))
    np.testing.assert_allclose(group["hidden"].values, expected, atol=1e-5)
    assert [r["kind"] for r in group.attrs["intervention"]] == ["head_ablation", "injection"]
    assert "intervention1_vector" in group and "intervention0_vector" not in group
    rebuilt = recorded_interventions(group)
    assert [item.describe() for item in rebuilt] == [item.describe() for item in both]


def test_hooks_are_removed_after_the_run_and_when_it_raises_mid_way(tiny_gemma, tmp_path):
    arch = tiny_gemma.arch
    before = hook_counts(arch)
    both = [HeadAblation(HEADS), Injection(vector_of(arch), 0)]
    extract(tiny_gemma, tmp_path / "s.zarr", setting="both", intervention=both, **COMMON)
    assert hook_counts(arch) == before

    class Boom(Exception):
        pass

    calls = []

    def second_batch_fails(module, args, output):
        calls.append(1)
        if len(calls) == 2:
            raise Boom

    handle = arch.layers[-1].register_forward_hook(second_batch_fails)
    try:
        with pytest.raises(Boom):
            extract(tiny_gemma, tmp_path / "s.zarr", setting="broken", intervention=both,
                    **{**COMMON, "batch_size": 2})
    finally:
        handle.remove()
    assert len(calls) == 2 and hook_counts(arch) == before
    # the interrupted group resumes under the same interventions, and the result equals an uninterrupted run
    resumed = extract(tiny_gemma, tmp_path / "s.zarr", setting="broken", intervention=both,
                      **{**COMMON, "batch_size": 2})
    whole = extract(tiny_gemma, tmp_path / "s.zarr", setting="both", intervention=both, **COMMON)
    np.testing.assert_allclose(resumed["hidden"].values, whole["hidden"].values, atol=1e-5)


def test_resume_with_another_intervention_is_refused(tiny_gemma, tmp_path):
    store = tmp_path / "s.zarr"
    arch = tiny_gemma.arch
    extract(tiny_gemma, store, setting="ablate", intervention=HeadAblation([(1, 2)]), **COMMON)
    extract(tiny_gemma, store, setting="ablate", intervention=HeadAblation([(1, 2)]), **COMMON)  # same: re-used
    for other in (HeadAblation([(1, 3)]), HeadAblation([(1, 2)], mode="mean", means=torch.zeros(
            arch.n_layers, arch.n_heads, arch.head_dim)), None):
        with pytest.raises(StoreError, match="differs in: intervention"):
            extract(tiny_gemma, store, setting="ablate", intervention=other, **COMMON)
    extract(tiny_gemma, store, setting="inject", intervention=Injection(vector_of(arch, 0), 2), **COMMON)
    with pytest.raises(StoreError, match="differs in: intervention"):  # same layer, another vector
        extract(tiny_gemma, store, setting="inject", intervention=Injection(vector_of(arch, 1), 2), **COMMON)


def test_a_plain_dict_is_refused_with_what_to_pass(tiny_gemma, tmp_path):
    with pytest.raises(InterventionError, match=r"not a dict.*heads\.HeadAblation\(.*heads\.Injection\("):
        extract(tiny_gemma, tmp_path / "s.zarr", setting="ablate", intervention={"kind": "ablate", "heads": [[1, 2]]},
                **COMMON)


def test_extract_inside_a_user_context_is_refused(tiny_gemma, tmp_path):
    with ablate(tiny_gemma, HEADS):
        with pytest.raises(InterventionError, match=r"intervention=heads\.HeadAblation"):
            extract(tiny_gemma, tmp_path / "s.zarr", **COMMON)
    extract(tiny_gemma, tmp_path / "s.zarr", **COMMON)  # outside the block it runs


def test_interventions_are_checked_against_the_model_before_anything_is_written(tiny_gemma, tmp_path):
    store = tmp_path / "s.zarr"
    with pytest.raises(InterventionError, match="block 9 is out of range 0..3"):
        extract(tiny_gemma, store, setting="bad", intervention=HeadAblation([(9, 0)]), **COMMON)
    with pytest.raises(InterventionError, match=r"the residual stream needs \(64,\)"):
        extract(tiny_gemma, store, setting="bad", intervention=[HeadAblation([(0, 0)]), Injection(torch.ones(3), 1)],
                **COMMON)
    assert not store.exists() or "bad" not in [p.name for p in store.iterdir()]


def test_a_new_kind_sees_each_batch_before_its_forward_pass(tiny_gemma, tmp_path):
    """The extension point of the kinds to come (edge knockout through the mask, patching from a donor run)."""
    from extraction.interventions import Intervention

    class Watch(Intervention):
        kind, usage, origin = "watch", "Watch()", None
        seen: list = []

        def check(self, arch):
            pass

        def install(self, arch, batch, stack):
            self.seen.append(batch.attention_mask.shape)
            stack.callback(self.seen.append, "undone")

        def settings(self):
            return {}

        @classmethod
        def from_record(cls, record, arrays):
            return cls()

    group = extract(tiny_gemma, tmp_path / "s.zarr", setting="watched", intervention=Watch(), **COMMON)
    # one install per batch (6 prompts in batches of 4 and 2), each undone before the next
    assert [entry if entry == "undone" else entry[0] for entry in Watch.seen] == [4, "undone", 2, "undone"]
    assert group.attrs["intervention"] == [{"kind": "watch", "data": {}, "origin": None}]
