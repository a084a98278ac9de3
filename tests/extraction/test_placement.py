"""Big models pass through: device_map, max_memory, quantised loading and the attention implementation reach
``from_pretrained``, are recorded in the provenance, and a split or offloaded model extracts the same states."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from extraction.errors import ModelLoadError
from extraction.extractor import extract
from extraction.models import load_model
from extraction.interventions import HeadAblation

EXTRACT = dict(task="sentiment", shots=2, n=6, progress=False)
#: The tiny Gemma's top-level modules, each placed on the CPU by name.
TINY_GEMMA_MAP = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                  "model.layers.1": "cpu", "model.layers.2": "cpu", "model.layers.3": "cpu", "model.norm": "cpu",
                  "lm_head": "cpu"}


@pytest.fixture(scope="module")
def reference(tiny_gemma, tmp_path_factory):
    """The plain model's group, and the same with heads 0.1 and 2.3 zero-ablated."""
    folder = tmp_path_factory.mktemp("reference")
    plain = extract(tiny_gemma, folder / "plain.zarr", **EXTRACT)
    ablated = extract(tiny_gemma, folder / "ablated.zarr", intervention=HeadAblation([(0, 1), (2, 3)]), **EXTRACT)
    return plain.load(), ablated.load()


def _same_as(reference, loaded, path, **kwargs):
    ds = extract(loaded, path, **EXTRACT, **kwargs)
    for name in ("hidden", "label_logits", "lens_label_logits", "lens_top_token", "pred_token", "unembed"):
        np.testing.assert_allclose(ds[name].values, reference[name].values, rtol=0, atol=1e-5, err_msg=name)
    return ds


def test_device_map_naming_every_module_extracts_the_same_states(tiny_gemma_dir, reference, tmp_path):
    loaded = load_model(str(tiny_gemma_dir), device_map=TINY_GEMMA_MAP)
    ds = _same_as(reference[0], loaded, tmp_path / "s.zarr")
    assert ds.attrs["provenance"]["device_map"] == TINY_GEMMA_MAP


def test_auto_device_map_with_max_memory_is_recorded_as_asked(tiny_gemma_dir, reference, tmp_path):
    loaded = load_model(str(tiny_gemma_dir), device_map="auto", max_memory={"cpu": "1GiB"})
    provenance = _same_as(reference[0], loaded, tmp_path / "s.zarr").attrs["provenance"]
    assert provenance["device_map"] == "auto" and provenance["max_memory"] == {"cpu": "1GiB"}


def test_a_model_offloaded_to_disk_extracts_and_intervenes_the_same(tiny_gemma_dir, reference, tmp_path):
    """max_memory too small for any module: every weight rests on disk and is loaded per forward pass by
    accelerate's hooks (parameters on ``meta`` in between); the read-out modules are kept resident."""
    loaded = load_model(str(tiny_gemma_dir), device_map="auto", max_memory={"cpu": 1000},
                        offload_folder=str(tmp_path / "offload"))
    assert loaded.provenance["placement"] == {"": "disk"} and loaded.device == torch.device("cpu")
    assert loaded.model.get_submodule("model.layers.0.mlp.up_proj").weight.device.type == "meta"
    _same_as(reference[0], loaded, tmp_path / "plain.zarr")
    _same_as(reference[1], loaded, tmp_path / "ablated.zarr", intervention=HeadAblation([(0, 1), (2, 3)]))


def test_attention_implementation_is_passed_and_recorded(tiny_gemma_dir):
    loaded = load_model(str(tiny_gemma_dir), attn_implementation="eager", check=False)
    assert loaded.model.config._attn_implementation == "eager"
    assert loaded.provenance["attn_implementation"] == "eager"
    assert load_model(str(tiny_gemma_dir), check=False).provenance["device_map"] is None


@pytest.mark.parametrize("options, message", [
    (dict(attn_implementation="fast"), "unknown attention implementation 'fast'"),
    (dict(device="gpu0"), "unknown device 'gpu0'"),
    (dict(device_map={"model.layers.0": "gpu"}), "unknown device 'gpu'"),
    (dict(device_map=3.5), "device_map must be one of auto"),
    (dict(device_map="automatic"), "device_map 'automatic' is neither one of auto"),
    (dict(device_map={}), "device_map is empty"),
    (dict(device="cpu", device_map="auto"), "either device"),
    (dict(device_map="auto", max_memory="20GiB"), "max_memory must map devices to sizes"),
    (dict(device_map="auto", max_memory={"cpu": "lots"}), "max_memory['cpu'] = 'lots' is not a size"),
    (dict(device_map="auto", max_memory={"cpu": 1.5}), "must be a size in bytes"),
    (dict(device_map="auto", max_memory={"gpu": "1GiB"}), "unknown device 'gpu'"),
    (dict(max_memory={"cpu": "1GiB"}), "max_memory needs a device_map"),
    (dict(quantization_config="int3"), "unknown quantization 'int3'"),
    (dict(quantization_config={"load_in_4bit": True}), "must name its kind as quant_method"),
    (dict(quantization_config='{"quant_method": '), "quantization is not valid JSON"),
])
def test_bad_options_are_one_line_errors_before_loading(tiny_gemma_dir, options, message):
    with pytest.raises(ModelLoadError) as error:
        load_model(str(tiny_gemma_dir), **options)
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.skipif(torch.cuda.device_count() > 3, reason="this machine has a cuda:3")
def test_a_device_this_machine_lacks_is_named(tiny_gemma_dir):
    with pytest.raises(ModelLoadError, match=r"device cuda:3 is not available here"):
        load_model(str(tiny_gemma_dir), device_map={"": "cuda:3"})


def _bitsandbytes_ready() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None and torch.cuda.is_available()


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes is installed")
def test_quantised_loading_without_its_backend_is_a_one_line_error(tiny_gemma_dir):
    with pytest.raises(ModelLoadError) as error:
        load_model(str(tiny_gemma_dir), quantization_config="bnb-4bit")
    assert "bitsandbytes" in str(error.value) and "\n" not in str(error.value)


def test_a_quantisation_table_builds_transformers_config():
    from transformers import BitsAndBytesConfig

    from extraction.quantisation import describe, quantization_config

    config = quantization_config({"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"})
    assert isinstance(config, BitsAndBytesConfig) and config.load_in_4bit and config.bnb_4bit_quant_type == "nf4"
    assert quantization_config(config) is config and quantization_config("") is None
    recorded = describe(quantization_config("bnb-8bit"))
    assert recorded["quant_method"] == "bitsandbytes" and recorded["load_in_8bit"] is True
    json.dumps(recorded)


@pytest.mark.skipif(not _bitsandbytes_ready(), reason="needs bitsandbytes and a CUDA device")
def test_a_4bit_model_extracts_and_records_its_quantisation(tiny_gemma_dir, tmp_path):
    loaded = load_model(str(tiny_gemma_dir), quantization_config="bnb-4bit", device_map={"": 0})
    ds = extract(loaded, tmp_path / "s.zarr", **EXTRACT)
    assert ds.attrs["provenance"]["quantization"]["load_in_4bit"] is True
    assert np.isfinite(ds["hidden"].values).all()


# -- the command line and the study config ---------------------------------------------------------------------
def test_extract_command_passes_the_model_options(tiny_gemma_dir, tmp_path):
    from icl_geometry.cli import main
    from extraction.store import open_group

    store = tmp_path / "s.zarr"
    assert main(["extract", "--model", str(tiny_gemma_dir), "--shots", "2", "--n", "4", "--out", str(store),
                 "--device-map", "auto", "--max-memory", "cpu=1GiB", "--attn-implementation", "eager"]) == 0
    provenance = open_group(store, "icl").attrs["provenance"]
    assert provenance["device_map"] == "auto" and provenance["max_memory"] == {"cpu": "1GiB"}
    assert provenance["attn_implementation"] == "eager"


@pytest.mark.parametrize("command", [["extract", "--out", "s.zarr"], ["heads", "score", "s.zarr"],
                                     ["flow", "scan"]])
def test_every_model_command_reads_the_same_options(command):
    from extraction.cli import model_kwargs
    from icl_geometry.cli import build_parser

    args = build_parser().parse_args(command + [
        "--device-map", '{"model.layers.0": 0, "lm_head": "cpu"}', "--max-memory", "0=20GiB, cpu=60GiB",
        "--quantization", "bnb-4bit", "--attn-implementation", "sdpa"])
    assert model_kwargs(args) == dict(
        dtype="float32", device=None, device_map={"model.layers.0": 0, "lm_head": "cpu"},
        max_memory={"0": "20GiB", "cpu": "60GiB"}, quantization_config="bnb-4bit", attn_implementation="sdpa")


@pytest.mark.parametrize("option, value, message", [
    ("--max-memory", "cpu", "--max-memory 'cpu' is malformed"),
    ("--device-map", "{auto", "--device-map is not valid JSON"),
    ("--attn-implementation", "fast", "unknown attention implementation 'fast'"),
])
def test_bad_model_options_exit_2_with_one_line(tiny_gemma_dir, tmp_path, capsys, option, value, message):
    from icl_geometry.cli import main

    code = main(["extract", "--model", str(tiny_gemma_dir), "--out", str(tmp_path / "s.zarr"), option, value])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


STUDY_MODEL = '''[model]
device_map = "auto"
max_memory = {0 = "20GiB", cpu = "60GiB"}
quantization = {quant_method = "bitsandbytes", load_in_4bit = true, bnb_4bit_quant_type = "nf4"}
attn_implementation = "sdpa"
'''


def test_study_config_model_table_round_trips_and_becomes_load_options(tmp_path):
    from icl_geometry.config import dump_toml, load_config

    path = tmp_path / "study.toml"
    path.write_text(STUDY_MODEL)
    config = load_config(path)
    assert config.model.max_memory == {"0": "20GiB", "cpu": "60GiB"}
    again = tmp_path / "again.toml"
    again.write_text(dump_toml(config))
    assert load_config(again) == config
    options = config.model.load_options()
    assert options["device_map"] == "auto" and options["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    assert options["device"] is None and options["attn_implementation"] == "sdpa"


def test_study_loads_its_model_with_the_table(tiny_gemma_dir, tmp_path):
    from icl_geometry.config import ModelSection, StudyConfig
    from icl_geometry.study import Study

    model = ModelSection(spec=str(tiny_gemma_dir), dtype="float32", device_map="auto", max_memory={"cpu": "1GiB"},
                         attn_implementation="eager")
    loaded = Study(StudyConfig(model=model), tmp_path / "study", progress=False).loaded
    assert loaded.provenance["max_memory"] == {"cpu": "1GiB"} and loaded.provenance["attn_implementation"] == "eager"


def test_head_sweep_edge_scan_and_task_vector_of_an_offloaded_model_are_the_same(tiny_gemma_dir, tmp_path):
    """The fast sweeps re-run upper blocks from recorded inputs, the task vector copies projections and norms; on
    an offloaded model every weight rests on ``meta`` between forward passes."""
    from heads.flow import edge_scan
    from heads.sweeps import sweep
    from heads.task_vectors import task_vector

    plain = load_model(str(tiny_gemma_dir), attn_implementation="eager")
    offloaded = load_model(str(tiny_gemma_dir), attn_implementation="eager", device_map="auto",
                           max_memory={"cpu": 1000}, offload_folder=str(tmp_path / "offload"))
    options = dict(shots=2, n=4, progress=False)
    heads = [(1, 2), (3, 0)]
    assert sweep(offloaded, heads=heads, **options).equals(sweep(plain, heads=heads, **options))
    scans = [edge_scan(model, edges=["y->final"], width=2, n_boot=10, **options) for model in (plain, offloaded)]
    for name in ("accuracy_change", "logit_change", "label_logits", "top_token"):
        np.testing.assert_allclose(scans[1][name].values, scans[0][name].values, atol=1e-5)
    vectors = [task_vector(model, heads, **options) for model in (plain, offloaded)]
    torch.testing.assert_close(vectors[1], vectors[0], rtol=0, atol=1e-6)


def test_device_loads_the_whole_model_there_and_is_recorded(tiny_gemma_dir):
    loaded = load_model(str(tiny_gemma_dir), device="cpu", check=False)
    assert loaded.device == torch.device("cpu") and loaded.provenance["device"] == "cpu"


def test_edge_knockouts_refuse_an_attention_without_a_mask_naming_the_option(tiny_gemma_dir, tmp_path):
    from extraction.edges import EdgeKnockout
    from extraction.errors import InterventionError

    loaded = load_model(str(tiny_gemma_dir), attn_implementation="flex_attention")
    assert loaded.provenance["attn_implementation"] == "flex_attention"
    with pytest.raises(InterventionError, match=r"not 'flex_attention'.*--attn-implementation"):
        extract(loaded, tmp_path / "s.zarr", intervention=EdgeKnockout("y->final", [1]), **EXTRACT)
