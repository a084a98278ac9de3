import numpy as np
import pytest
import torch
import xarray as xr

from extraction.errors import ModelLoadError, PromptError, StoreError
from extraction.extractor import accuracy, extract
from extraction.models import load_model
from extraction.store import list_groups, open_group

N = 12


def test_store_schema_and_values(tiny_gemma, tmp_path):
    store = tmp_path / "s.zarr"
    ds = extract(tiny_gemma, store, task="sentiment", shots=3, n=N, batch_size=5, progress=False)
    arch = tiny_gemma.arch
    assert ds["hidden"].dims == ("example", "layer", "dim")
    assert ds["hidden"].shape == (N, arch.n_layers + 1, arch.hidden_size)
    assert ds["hidden"].encoding["chunks"][1] == 1  # chunks hold whole layers
    assert list(ds["class"].values) == ["negative", "positive"]
    assert ds["demo_indices"].shape == (N, 3)
    assert ds["lens_label_logits"].dims == ("example", "layer", "class")
    assert ds.attrs["config"]["shots"] == 3 and ds.attrs["provenance"]["dtype"] == "float32"
    assert "before the final norm" in ds.attrs["layer_convention"]
    # the lens at the last layer is the model's own output
    np.testing.assert_allclose(ds["lens_label_logits"][:, -1].values, ds["label_logits"].values, atol=1e-4)
    assert (ds["lens_top_token"][:, -1] == ds["pred_token"]).all()
    assert ((ds["pred_token"] == ds["label_token"][ds["label"]]) == ds["correct"]).all()
    np.testing.assert_allclose(ds["unembed"].values,
                               arch.unembedding.weight[ds["label_token"].values].detach().numpy())
    assert set(list_groups(store)) == {"icl"}
    assert set(accuracy(ds)) == {"accuracy", "label_accuracy"}


def test_states_match_a_plain_forward(tiny_gemma, tmp_path):
    ds = extract(tiny_gemma, tmp_path / "s.zarr", shots=2, n=4, batch_size=4, progress=False)
    for i in range(4):
        encoded = tiny_gemma.tokenizer([str(ds["prompt"].values[i])], return_tensors="pt")
        with torch.no_grad():
            hidden = tiny_gemma.model(**encoded, output_hidden_states=True).hidden_states
        expected = torch.stack([h[0, -1] for h in hidden[:-1]]).numpy()
        np.testing.assert_allclose(ds["hidden"].values[i, :-1], expected, atol=1e-5)


def test_batched_equals_unbatched(tiny_gemma, tmp_path):
    one = extract(tiny_gemma, tmp_path / "a.zarr", shots=4, n=N, batch_size=1, progress=False)
    many = extract(tiny_gemma, tmp_path / "b.zarr", shots=4, n=N, batch_size=7, progress=False)
    np.testing.assert_allclose(one["hidden"].values, many["hidden"].values, atol=1e-5)
    np.testing.assert_allclose(one["label_logits"].values, many["label_logits"].values, atol=1e-5)
    assert (one["prompt"].values == many["prompt"].values).all()


class Interrupt(Exception):
    pass


def test_interrupted_run_resumes_with_nothing_lost_or_duplicated(tiny_gemma, tmp_path):
    store = tmp_path / "s.zarr"
    reference = extract(tiny_gemma, tmp_path / "ref.zarr", shots=3, n=N, batch_size=4, progress=False)
    calls = {"n": 0}

    def stop_on_third_batch(module, args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise Interrupt

    handle = tiny_gemma.arch.layers[0].register_forward_pre_hook(stop_on_third_batch)
    try:
        with pytest.raises(Interrupt):
            extract(tiny_gemma, store, shots=3, n=N, batch_size=4, progress=False)
    finally:
        handle.remove()
    with pytest.raises(StoreError, match="incomplete"):
        open_group(store, "icl")
    partial = xr.open_zarr(store, group="icl", consolidated=False)
    assert int(partial["done"].sum()) == 8
    resumed = extract(tiny_gemma, store, shots=3, n=N, batch_size=4, progress=False)
    assert bool(resumed["done"].all())
    np.testing.assert_allclose(resumed["hidden"].values, reference["hidden"].values, atol=1e-5)
    assert (resumed["query_index"].values == reference["query_index"].values).all()
    assert len(set(resumed["query_index"].values.tolist())) == N


def test_different_configuration_is_refused_unless_overwrite(tiny_gemma, tmp_path):
    store = tmp_path / "s.zarr"
    extract(tiny_gemma, store, shots=2, n=4, progress=False)
    with pytest.raises(StoreError, match="different configuration.*seed"):
        extract(tiny_gemma, store, shots=2, n=4, seed=1, progress=False)
    ds = extract(tiny_gemma, store, shots=2, n=4, seed=1, overwrite=True, progress=False)
    assert ds.attrs["config"]["seed"] == 1


def test_several_settings_live_in_one_store(tiny_gemma, tmp_path):
    store = tmp_path / "s.zarr"
    extract(tiny_gemma, store, shots=2, n=4, progress=False)
    extract(tiny_gemma, store, shots=0, n=4, progress=False)
    assert list_groups(store) == ["icl", "zero_shot"]
    assert xr.open_zarr(store, group="zero_shot", consolidated=False)["demo_indices"].shape == (4, 0)
    with pytest.raises(StoreError, match="no group 'ablate'"):
        open_group(store, "ablate")


def test_float16_storage(tiny_gemma, tmp_path):
    ds = extract(tiny_gemma, tmp_path / "s.zarr", shots=1, n=3, store_dtype="float16", progress=False)
    assert ds["hidden"].dtype == np.float16


def test_prompt_longer_than_the_context(tiny_model_dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    config = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["gpt2"]).config
    config.n_positions = 40
    short = tmp_path / "short"
    AutoModelForCausalLM.from_config(config).save_pretrained(short)
    load_model(str(tiny_model_dirs["gpt2"])).tokenizer.save_pretrained(short)
    with pytest.raises(PromptError, match="longer than the model's context of 40"):
        extract(load_model(str(short)), tmp_path / "s.zarr", shots=8, n=2, progress=False)


def test_nonexistent_model_path(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(str(tmp_path / "nowhere"))
    with pytest.raises(ModelLoadError, match="GGUF file not found"):
        load_model(str(tmp_path / "model.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path / "empty"))


@pytest.mark.real_model
def test_real_model_icl_beats_zero_shot(real_model, tmp_path):
    store = tmp_path / "real.zarr"
    icl = accuracy(extract(real_model, store, task="sentiment", shots=8, n=48, batch_size=8, progress=False))
    zero = accuracy(extract(real_model, store, task="sentiment", shots=0, n=48, batch_size=8, progress=False))
    print(f"\nreal model sentiment n=48: 8-shot {icl}, zero-shot {zero}")
    assert icl["accuracy"] >= zero["accuracy"] + 0.3
    states = torch.from_numpy(open_group(store, "icl")["hidden"].values[:16]).reshape(-1, real_model.arch.hidden_size)
    with torch.no_grad():
        exact = real_model.arch.readout(states).argmax(dim=-1).numpy()
    stored = open_group(store, "icl")["lens_top_token"].values[:16].reshape(-1)
    assert (stored == exact).all()  # the certified bfloat16 shortlist gives the exact whole-vocabulary top-1
