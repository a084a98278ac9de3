"""The one read-out reproduces each model's own logits, output scaling and soft-capping included."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

import extraction.readout as readout_module
from extraction.errors import ArchitectureError
from extraction.extractor import extract
from extraction.models import load_model
from extraction.readout import output_postprocessing

POSTPROCESSED = {"gemma2": (1.0, 1.5), "cohere": (0.25, None), "granite": (0.25, None)}


@pytest.mark.parametrize("config, expected", [
    (SimpleNamespace(), (1.0, None)),
    (SimpleNamespace(final_logit_softcapping=30.0), (1.0, 30.0)),
    (SimpleNamespace(final_logit_softcapping=None), (1.0, None)),
    (SimpleNamespace(logit_scale=0.0625), (0.0625, None)),
    (SimpleNamespace(logits_scaling=8), (0.125, None)),
    (SimpleNamespace(text_config=SimpleNamespace(output_multiplier=0.5, final_logit_softcapping=15.0)), (0.5, 15.0)),
])
def test_output_postprocessing_is_read_from_the_config_table(config, expected):
    assert output_postprocessing(config) == expected


def test_a_non_positive_scale_is_refused():
    with pytest.raises(ArchitectureError, match="logit_scale is -1.0"):
        output_postprocessing(SimpleNamespace(logit_scale=-1.0))


@pytest.mark.parametrize("name", sorted(POSTPROCESSED))
@torch.no_grad()
def test_readout_reproduces_the_models_postprocessed_logits(tiny_model_dirs, name):
    loaded = load_model(str(tiny_model_dirs[name]))  # the capture check at load passes
    readout = loaded.arch.readout
    assert (readout.scale, readout.softcap) == POSTPROCESSED[name]
    encoded = loaded.tokenizer(["a great movie . Sentiment :"], return_tensors="pt")
    output = loaded.model(**encoded, output_hidden_states=True)
    final = output.hidden_states[-1][0, -1]  # Hugging Face's last entry is after the final norm
    torch.testing.assert_close(readout.postprocess(readout.project(final)), output.logits[0, -1], atol=1e-5, rtol=0)
    tokens = [5, 7, 11]
    torch.testing.assert_close(readout.postprocess(readout.project(final, tokens)), output.logits[0, -1, tokens],
                               atol=1e-5, rtol=0)
    if readout.softcap:
        assert output.logits.abs().max() < readout.softcap


@pytest.mark.parametrize("name", sorted(POSTPROCESSED))
def test_store_records_the_readout_and_the_lens_reproduces_the_logits(tiny_model_dirs, tmp_path, name):
    loaded = load_model(str(tiny_model_dirs[name]))
    ds = extract(loaded, tmp_path / "s.zarr", task="sentiment", shots=2, n=6, progress=False)
    assert (ds.attrs["lens_logit_scale"], ds.attrs["lens_softcap"]) == POSTPROCESSED[name]
    # The lens of the last state (before the final norm) is the model's own output.
    np.testing.assert_allclose(ds["lens_label_logits"].values[:, -1], ds["label_logits"].values, atol=1e-5)
    # The stored label rows and attrs reproduce the read-out without the model, up to the norm's epsilon, which is
    # not stored (a tiny random model's states have an RMS near 0.02, where an epsilon of 1e-5 moves logits by 1%).
    hidden = ds["hidden"].values[:, -1].astype(np.float64)
    normed = hidden - hidden.mean(1, keepdims=True) if ds.attrs["lens_center"] else hidden
    normed = normed / np.sqrt((normed ** 2).mean(1, keepdims=True))
    raw = ds.attrs["lens_logit_scale"] * (normed @ ds["lens_unembed"].values.T + ds["lens_bias"].values)
    cap = ds.attrs["lens_softcap"]
    np.testing.assert_allclose(cap * np.tanh(raw / cap) if cap else raw, ds["label_logits"].values, rtol=2e-2)


def test_an_unknown_output_step_fails_the_capture_check_at_load(tiny_model_dirs, monkeypatch):
    steps = tuple(step for step in readout_module.OUTPUT_STEPS if step[0] != "logits_scaling")
    monkeypatch.setattr(readout_module, "OUTPUT_STEPS", steps)
    with pytest.raises(ArchitectureError, match=r"read-out .*final norm, LM head.* does not reproduce"):
        load_model(str(tiny_model_dirs["granite"]))
