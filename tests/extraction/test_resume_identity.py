"""A resume must use a model that computes the same numbers: the dtype and the quantisation it was loaded with are
part of a group's identity; stores written before the quantisation was recorded still resume unquantised."""

import dataclasses

import pytest

from extraction import quantisation
from extraction.errors import GroupClashError
from extraction.extractor import extract
from extraction.models import load_model
from extraction.store import open_root

RUN = dict(shots=2, n=4, batch_size=2, progress=False)


def quantised(name):
    """The recorded provenance of a model quantised as ``name`` (the quantisation library need not be present)."""
    return quantisation.describe(quantisation.quantization_config(name))


def with_options(loaded, **provenance):
    """``loaded`` as if it had been loaded with other options (only the recorded provenance changes)."""
    return dataclasses.replace(loaded, provenance={**loaded.provenance, **provenance})


def as_older_store(store, group="icl"):
    """Make ``group`` look written by code that did not record the quantisation, with its last example pending."""
    node = open_root(store, mode="a")[group]
    node.attrs["config"] = {k: v for k, v in node.attrs["config"].items() if k != "quantization"}
    node["done"][-1] = False


def test_resume_with_another_dtype_is_refused_naming_both(tiny_gemma, tiny_gemma_dir, tmp_path):
    store = tmp_path / "s.zarr"
    extract(tiny_gemma, store, **RUN)
    half = load_model(str(tiny_gemma_dir), dtype="bfloat16", check=False)
    with pytest.raises(GroupClashError) as error:
        extract(half, store, **RUN)
    assert error.value.changed == ["dtype"]
    assert "\n" not in str(error.value)
    assert "dtype" in error.value.problem and "float32" in error.value.problem and "bfloat16" in error.value.problem


def test_resume_with_a_quantised_model_is_refused(tiny_gemma, tmp_path):
    store = tmp_path / "s.zarr"
    extract(tiny_gemma, store, **RUN)
    four_bit = with_options(tiny_gemma, quantization=quantised("bnb-4bit"))
    with pytest.raises(GroupClashError, match="quantization") as error:
        extract(four_bit, store, **RUN)
    assert error.value.changed == ["quantization"]
    assert "quantization (null stored, {\"_load_in_4bit\": true" in error.value.problem


def test_resume_with_another_quantisation_names_the_differing_options(tiny_gemma, tmp_path):
    store = tmp_path / "s.zarr"
    four_bit = with_options(tiny_gemma, quantization=quantised("bnb-4bit"))
    nf4 = with_options(tiny_gemma, quantization=quantised("bnb-nf4"))
    extract(four_bit, store, **RUN)
    with pytest.raises(GroupClashError, match=r"quantization\.bnb_4bit_quant_type \(\"fp4\" stored, \"nf4\" now\)"):
        extract(nf4, store, **RUN)


def test_placement_and_attention_do_not_change_the_identity(tiny_gemma, tmp_path):
    store = tmp_path / "s.zarr"
    extract(tiny_gemma, store, **RUN)
    elsewhere = with_options(tiny_gemma, device_map={"": "cpu"}, attn_implementation="eager", device="cpu")
    assert bool(extract(elsewhere, store, **RUN)["done"].all())


def test_an_older_store_resumes_unquantised_and_refuses_quantised(tiny_gemma, tmp_path):
    store = tmp_path / "s.zarr"
    extract(tiny_gemma, store, **RUN)
    as_older_store(store)
    eight_bit = with_options(tiny_gemma, quantization=quantised("bnb-8bit"))
    with pytest.raises(GroupClashError, match="quantization"):
        extract(eight_bit, store, **RUN)
    assert bool(extract(tiny_gemma, store, **RUN)["done"].all())


def test_the_cli_refuses_another_dtype_in_one_line(tiny_gemma_dir, tmp_path, capsys):
    from icl_geometry.cli import main

    command = ["extract", "--model", str(tiny_gemma_dir), "--shots", "1", "--n", "2", "--out", str(tmp_path / "s.zarr")]
    assert main(command) == 0
    assert main(command + ["--dtype", "bfloat16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # the line after the first run's progress bar
    assert err.startswith("icl-geometry: error:") and "--overwrite" in err
    assert 'dtype ("float32" stored, "bfloat16" now)' in err
