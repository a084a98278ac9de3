"""The study configuration: round trip, defaults, and bad files rejected with the key named."""

from __future__ import annotations

import pytest

from icl_geometry.config import ConfigError, StudyConfig, dump_toml, load_config, quick_config


def test_defaults_round_trip_through_toml(tmp_path):
    config = StudyConfig()
    path = tmp_path / "study.toml"
    path.write_text(dump_toml(config))
    assert load_config(path) == config


def test_edited_config_round_trips_and_overrides_only_its_keys(tmp_path):
    path = tmp_path / "study.toml"
    path.write_text('[data]\ntasks = ["sentiment"]\nshots = [0, 2, 4, 8]\nseparator = "\\n\\n"\n[heads]\nfraction = 0.2\n')
    config = load_config(path)
    assert config.data.shots == [0, 2, 4, 8] and config.k_values == [2, 4, 8]
    assert config.data.separator == "\n\n" and config.heads.fraction == 0.2
    assert config.model == StudyConfig().model
    again = tmp_path / "again.toml"
    again.write_text(dump_toml(config))
    assert load_config(again) == config


def test_pth_first_pair_key(tmp_path):
    path = tmp_path / "study.toml"
    path.write_text("[heads]\npth_first_pair = false\n")
    assert load_config(path).heads.pth_first_pair is False and StudyConfig().heads.pth_first_pair is True


def test_yaml_is_accepted(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text("data:\n  tasks: [topic]\n  n: 32\n")
    assert load_config(path).data.n == 32


def test_quick_builds_on_the_quick_defaults(tmp_path):
    path = tmp_path / "q.toml"
    path.write_text("[data]\nn = 8\n")
    config = load_config(path, quick=True)
    assert config.data.n == 8 and config.data.tasks == quick_config().data.tasks


@pytest.mark.parametrize("text, message", [
    ("[data]\nshots = \"8\"", "data.shots must be a list of int"),
    ("[data]\nshot = [8]", "unknown key data.shot"),
    ("[modle]\nspec = \"x\"", "unknown section [modle]"),
    ("[model]\ndtype = \"int8\"", "model.dtype must be one of"),
    ("[data]\nn = 1.5", "data.n must be int"),
    ("[data]\nn = 0", "data.n must be >= 1"),
    ("[heads]\nenabled = \"yes\"", "heads.enabled must be bool"),
    ("[heads]\nfraction = 1.5", "heads.fraction must be between 0 and 1"),
    ("[data]\ntasks = [\"no_such_task\"]", "data.tasks: 'no_such_task' is neither"),
    ("[data]\ntasks = []", "data.tasks is empty"),
    ("[geometry]\nmin_rise = -0.1", "geometry.min_rise must be a finite number >= 0"),
    ("[geometry]\nmin_rise = inf", "geometry.min_rise must be a finite number >= 0"),
    ("[data]\nshots = [0]\n[heads]\nenabled = false", "no k > 0"),
    ("data = 3", "[data] must be a table"),
    ("[data\nn = 3", "cannot be parsed"),
    ("[cluster]\nscheduler = \"tcp://h:8786\"\nworkers = 2", "[cluster] takes scheduler or workers, not both"),
    ("[cluster]\nworkers = -1", "cluster.workers and cluster.example_chunk must be >= 0"),
    ('[model]\nmax_memory = "20GiB"\n', "model.max_memory must be a table of keys"),
    ('[model]\ndevice_map = 3\n', "model.device_map must be str or a table"),
    ('[model]\nattn_implementation = "fast"\n', "model.attn_implementation: unknown attention implementation"),
    ('[model]\nquantization = "int3"\n', "model.quantization: unknown quantization 'int3'"),
])
def test_bad_config_is_rejected_naming_the_key(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert message in str(error.value)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml")
