"""Every public entry point on a tiny random model of every tested architecture family.

The families differ where the toolkit hooks them: Llama and Mistral (sliding window), Qwen 2 (bias on q, k, v),
Gemma 2 (attention and final-logit soft-capping, alternating sliding window, post-attention norm), Gemma 3 (grouped
queries, head_dim != hidden / heads, (1 + w) norms), GPT-2 (Conv1D layers, fused qkv, LayerNorm), GPT-NeoX
(parallel attention and MLP, rotary on part of each head) and Phi-3 (fused qkv_proj). Each runs extraction
(captured states equal ``output_hidden_states``, logits reproduced, batched equals unbatched), the measures, head
scores, ablation, injection, task vectors, the fast and naive sweeps and the study.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import geometry
import heads
from extraction.capture import forward_last, run_with_capture
from extraction.extractor import extract
from extraction.models import load_model
from extraction.store import list_groups, open_group

ARCHITECTURES = ["llama", "mistral", "qwen2", "gemma2", "gemma3", "gpt2", "gpt_neox", "phi3"]
#: Architectures that also run the whole study (geometry, tables and report included), which takes longer.
FULL_STUDY = ["gemma2", "gpt_neox"]
N, SHOTS = 16, 2
PROMPT = "a great movie . Sentiment : positive\nthe food was cold . Sentiment :"


@pytest.fixture(scope="module", params=ARCHITECTURES)
def loaded(request, tiny_model_dirs):
    return load_model(str(tiny_model_dirs[request.param]))


@pytest.fixture(scope="module")
def store(loaded, tmp_path_factory):
    """A store with an ICL group extracted in batches of 5 prompts and the same group one prompt at a time."""
    path = tmp_path_factory.mktemp("arch") / "s.zarr"
    extract(loaded, path, task="sentiment", shots=SHOTS, n=N, batch_size=5, progress=False)
    extract(loaded, path, task="sentiment", shots=SHOTS, n=N, batch_size=1, setting="alone", progress=False)
    return path


def test_the_matrix_covers_every_tiny_model(tiny_model_dirs):
    assert set(ARCHITECTURES) <= set(tiny_model_dirs)


def test_discovery_matches_the_config(loaded):
    arch, config = loaded.arch, loaded.model.config
    assert arch.n_layers == config.num_hidden_layers == len(arch.layers) == len(arch.output_projections)
    assert arch.n_heads == config.num_attention_heads
    assert arch.vocab_size == config.vocab_size and arch.hidden_size == config.hidden_size


@torch.no_grad()
def test_stored_states_equal_output_hidden_states_and_logits_are_reproduced(loaded, store):
    ds = open_group(store, "icl")
    tokens = ds["label_token"].values
    for example in (0, N - 1):
        encoded = loaded.tokenizer([str(ds["prompt"].values[example])], return_tensors="pt")
        output = loaded.model(**encoded, output_hidden_states=True)
        hidden = ds["hidden"].values[example]
        for layer in range(loaded.arch.n_layers):
            np.testing.assert_allclose(hidden[layer], output.hidden_states[layer][0, -1].numpy(), atol=1e-5)
        # Hugging Face's last entry is after the final norm; the store's is before it.
        final = loaded.arch.final_norm(torch.from_numpy(hidden[-1]))
        np.testing.assert_allclose(final.numpy(), output.hidden_states[-1][0, -1].numpy(), atol=1e-5)
        np.testing.assert_allclose(ds["label_logits"].values[example], output.logits[0, -1, tokens].numpy(),
                                   atol=1e-5)
        assert ds["pred_token"].values[example] == int(output.logits[0, -1].argmax())
    # The logit lens of the last state is the model's read-out (soft-capping and scaling included).
    np.testing.assert_allclose(ds["lens_label_logits"].values[:, -1], ds["label_logits"].values, atol=1e-5)
    assert ds.attrs["lens_form_exact"] is True


def test_batched_extraction_equals_one_prompt_at_a_time(store):
    batched, alone = open_group(store, "icl"), open_group(store, "alone")
    for name in ("hidden", "label_logits", "lens_label_logits"):
        np.testing.assert_allclose(batched[name].values, alone[name].values, atol=2e-5, err_msg=name)
    assert (batched["lens_top_token"].values == alone["lens_top_token"].values).all()


def test_measures_run_on_the_store(store):
    result = geometry.measure(store, "icl", n_boot=0, progress=False)
    values = result["value"].values
    assert values.shape[0] == open_group(store, "icl").sizes["layer"]
    assert np.isfinite(values).any(axis=0).all()  # every measure has a value at some layer


def test_head_scores_cover_every_head(loaded):
    scores = heads.score(loaded, task="sentiment", shots=SHOTS, n=4, n_random=2, repeat=6, progress=False)
    arch = loaded.arch
    for name in heads.SCORES:
        values = scores[name].values
        assert values.shape == (arch.n_layers, arch.n_heads), name
        assert np.isfinite(values).all() and (values >= -1e-6).all() and (values <= 1 + 1e-6).all(), name


def _input_weight_rows(projection: torch.nn.Module) -> torch.Tensor:
    """The output projection's weight with one row per input feature (Conv1D stores (in, out), Linear (out, in))."""
    weight = projection.weight
    return weight if hasattr(projection, "nf") else weight.T


@torch.no_grad()
def test_ablation_equals_zeroing_the_heads_projection_weights(loaded):
    arch = loaded.arch
    encoded = loaded.tokenizer([PROMPT], return_tensors="pt")
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    layer, head = arch.n_layers - 2, 1
    clean = forward_last(loaded.model, ids, mask)
    with heads.ablate(loaded, [(layer, head)]):
        ablated = forward_last(loaded.model, ids, mask)
    rows = _input_weight_rows(arch.output_projections[layer])
    span = slice(head * arch.head_dim, (head + 1) * arch.head_dim)
    saved = rows[span].clone()
    rows[span] = 0
    try:
        zeroed = forward_last(loaded.model, ids, mask)
    finally:
        rows[span] = saved
    assert (ablated - clean).abs().max() > 1e-6
    torch.testing.assert_close(ablated, zeroed, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_injection_moves_exactly_the_chosen_state(loaded):
    arch = loaded.arch
    encoded = loaded.tokenizer([PROMPT], return_tensors="pt")
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    vector = torch.randn(arch.hidden_size, generator=torch.Generator().manual_seed(0))
    clean, _ = run_with_capture(loaded, ids, mask)
    with heads.inject(loaded, vector, 1):
        injected, _ = run_with_capture(loaded, ids, mask)
    torch.testing.assert_close(injected[:, 0], clean[:, 0])
    torch.testing.assert_close(injected[:, 1] - clean[:, 1], vector[None], atol=1e-5, rtol=1e-5)
    with heads.inject(loaded, vector, arch.n_layers):
        logits = forward_last(loaded.model, ids, mask)
    torch.testing.assert_close(logits, arch.readout(clean[:, -1] + vector), atol=1e-4, rtol=1e-4)


def test_task_vector_is_a_residual_vector(loaded):
    vector = heads.task_vector(loaded, [(0, 0), (loaded.arch.n_layers - 1, 2)], task="sentiment", shots=SHOTS, n=4,
                               progress=False)
    assert vector.shape == (loaded.arch.hidden_size,)
    assert torch.isfinite(vector).all() and vector.abs().max() > 0


def test_fast_sweep_equals_the_naive_sweep(loaded):
    options = dict(task="sentiment", shots=SHOTS, n=4, batch_size=4, progress=False)
    fast = heads.sweep(loaded, method="fast", **options)
    naive = heads.sweep(loaded, method="naive", **options)
    np.testing.assert_allclose(fast["label_logits"].values, naive["label_logits"].values, atol=1e-4)
    np.testing.assert_allclose(fast["logit_diff"].values, naive["logit_diff"].values, atol=1e-4)


def _study(folder, model_dir):
    from icl_geometry.config import DataSection, GeometrySection, HeadsSection, ModelSection, StudyConfig
    from icl_geometry.study import Study

    config = StudyConfig(
        model=ModelSection(spec=str(model_dir), dtype="float32", batch_size=4),
        data=DataSection(tasks=["sentiment"], shots=[2], n=12),
        geometry=GeometrySection(n_boot=10),
        heads=HeadsSection(shots=2, n_score=6, fraction=0.25),
    )
    return Study(config, folder, progress=False)


def test_study_model_stages_run(loaded, tmp_path, monkeypatch):
    """The stages that run the model (extractions and the heads analysis); the others only read stores."""
    study = _study(tmp_path, loaded.provenance["model_spec"])
    stages = [stage for stage in study.stages() if ": extract" in stage.name or stage.name.endswith(": heads")]
    monkeypatch.setattr(study, "stages", lambda: stages)
    study.run()
    groups = {"icl", "zero_shot", "ablate_pth", "ablate_ih", "ablate_random", "inject_ih", "inject_pth"}
    assert groups <= set(list_groups(study.store("sentiment")))


@pytest.mark.parametrize("name", FULL_STUDY)
def test_whole_study_runs(tiny_model_dirs, tmp_path, name):
    report = _study(tmp_path, tiny_model_dirs[name]).run()
    assert report.is_file() and (tmp_path / "tables" / "measures.csv").stat().st_size > 0


@pytest.mark.parametrize("name", ["gemma2", "gpt_neox"])
def test_bfloat16_load_passes_the_capture_check(tiny_model_dirs, name):
    loaded = load_model(str(tiny_model_dirs[name]), dtype="bfloat16")  # check=True: the read-out is verified
    assert loaded.arch.unembedding.weight.dtype == torch.bfloat16
