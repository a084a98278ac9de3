"""The study configuration: a TOML (or YAML) file of documented sections and keys, validated before anything runs.

Every key has a default, so an empty file (or no file) is the paper's set-up on the bundled model. Unknown
sections or keys and values of the wrong type are rejected with a message that names the key. The effective
configuration is written next to the results (:func:`dump_toml`), and :func:`load_config` reads it back unchanged.

Example ``study.toml``::

    [model]
    spec = "./my-llama"        # hub id in the local cache, Hugging Face folder or .gguf; "default" = Gemma 3 270M
    dtype = "bfloat16"
    device_map = "auto"        # a big model spread over the GPUs, at most 20 GiB on each, the rest in CPU memory
    max_memory = {0 = "20GiB", 1 = "20GiB", cpu = "60GiB"}

    [data]
    tasks = ["sentiment", "reviews.csv"]
    shots = [0, 2, 4, 8, 16]   # a k sweep; ablations and injections use heads.shots
    n = 128

    [heads]
    fraction = 0.1

    [cluster]                  # optional: shard every extraction over Dask (pip install 'icl-geometry[dask]')
    workers = 4                # a local cluster of 4 single-threaded worker processes, or
    # scheduler = "tcp://head-node:8786"
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from extraction.errors import ICLGeometryError
from extraction.tasks import list_tasks


class ConfigError(ICLGeometryError):
    """A study configuration that cannot be used (unknown key, wrong type, impossible value)."""


@dataclass
class ModelSection:
    """Which model runs and how."""

    spec: str = "default"  #: hub id, local Hugging Face folder or .gguf file; "default" is Gemma 3 270M
    dtype: str = "bfloat16"  #: float32, bfloat16 or float16; stores always hold float32 states
    device: str = ""  #: torch device such as "cuda"; empty: where the model loads (CPU here)
    #: spread a big model: "auto", "balanced", "sequential", one device, or a table of module -> device; empty: none
    device_map: str | dict = ""
    max_memory: dict = field(default_factory=dict)  #: cap per device for device_map, e.g. {0 = "20GiB", cpu = "60GiB"}
    #: quantised weights: "bnb-4bit", "bnb-nf4", "bnb-8bit" or a table with quant_method and its options; empty: none
    quantization: str | dict = ""
    attn_implementation: str = ""  #: eager, sdpa, flash_attention_2, ...; empty: transformers' choice
    batch_size: int = 8  #: prompts per forward pass

    def load_options(self) -> dict[str, Any]:
        """Keyword arguments of ``extraction.load_model`` (after the spec); empty values mean "not given"."""
        return dict(dtype=self.dtype, device=self.device or None, device_map=self.device_map or None,
                    max_memory=self.max_memory or None, quantization_config=self.quantization or None,
                    attn_implementation=self.attn_implementation or None)


@dataclass
class DataSection:
    """Tasks and prompts."""

    tasks: list[str] = field(default_factory=list_tasks)  #: built-in task names or .csv/.jsonl/.parquet files
    shots: list[int] = field(default_factory=lambda: [8])  #: k values; 0 is added for the zero-shot baseline
    n: int = 64  #: queries per setting
    seed: int = 0  #: seed of demonstration and query sampling
    separator: str = "\n"  #: text between demonstrations
    sampling: str = "uniform"  #: uniform or balanced demonstrations
    label_mode: str = "words"  #: words, symbolic or random (control)


@dataclass
class GeometrySection:
    """The layer-wise measures."""

    n_boot: int = 1000  #: bootstrap resamples of the queries for confidence intervals
    n_boot_separability: int = 10  #: resamples for separability's CI (each refits the probe: raise for publication)
    rank: int = 10  #: rank of the low-rank denoising
    seed: int = 0  #: bootstrap and classifier-split seed
    min_rise: float = 0.0  #: smallest rise of composite alignment that counts as a transition (0: any rise)
    #: variance alignment as the share of variance along d (true) or [Y]'s appendix form dᵀ(H̄ᵀH̄/n)d (false)
    normalize_variance: bool = True


@dataclass
class HeadsSection:
    """Head scores, ablations and task-vector injections."""

    enabled: bool = True  #: run the heads analysis at all
    shots: int = 8  #: k of the prompts that are scored, ablated and used for task vectors
    n_score: int = 50  #: prompts used for the PTH / IH scores and task vectors (the paper's 50)
    fraction: float = 0.1  #: top fraction of all heads taken as PTH / IH sets (the paper's 10%)
    pth_first_pair: bool = True  #: PTH score counts the 2nd token's attention to the 1st ([Y]); false: leaves it out
    mode: str = "zero"  #: ablation mode, zero or mean (the random control set is drawn with data.seed)


def _all_edges() -> list[str]:
    from extraction.edges import EDGE_TYPES

    return list(EDGE_TYPES)


@dataclass
class FlowSection:
    """Attention-edge knockout scans ([B]; ``heads.edge_scan``), off by default."""

    enabled: bool = False  #: run the edge scan per task
    shots: int = 8  #: k of the scanned prompts
    n: int = 32  #: prompts per scan
    width: int = 3  #: blocks per layer window (stride 1)
    edges: list[str] = field(default_factory=_all_edges)  #: edge types to knock out (default: all six)
    #: cells ``EDGE@FIRST`` whose knockout (``width`` blocks from FIRST, on the ``icl`` prompts) is extracted and
    #: measured: every measure's change per layer against ``icl`` (changes table and figure)
    knockouts: list[str] = field(default_factory=list)


@dataclass
class ClusterSection:
    """Where the study's extractions run (``extract(client=, workers=, example_chunk=)``); left out of the
    fingerprint, since the stores are the same wherever they are computed."""

    scheduler: str = ""  #: address of a running Dask scheduler, e.g. "tcp://head-node:8786"; empty: none
    workers: int = 0  #: a local cluster of this many single-threaded worker processes; 0: none (one process)
    example_chunk: int = 0  #: examples per store chunk along example, one shard each; 0: the default (512)


@dataclass
class StudyConfig:
    """The whole study: one section per stage family."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    geometry: GeometrySection = field(default_factory=GeometrySection)
    heads: HeadsSection = field(default_factory=HeadsSection)
    flow: FlowSection = field(default_factory=FlowSection)
    cluster: ClusterSection = field(default_factory=ClusterSection)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """A stable text of the configuration (finished stages are tied to it), where the run happens left out."""
        return json.dumps({k: v for k, v in self.to_dict().items() if k != "cluster"}, sort_keys=True)

    @property
    def k_values(self) -> list[int]:
        """The ICL shot counts, each once, in increasing order (zero-shot is always run as the baseline)."""
        return sorted(set(k for k in self.data.shots if k > 0) | ({self.heads.shots} if self.heads.enabled else set()))


CHOICES = {
    ("model", "dtype"): ("float32", "bfloat16", "float16"),
    ("data", "sampling"): ("uniform", "balanced"),
    ("data", "label_mode"): ("words", "symbolic", "random"),
    ("heads", "mode"): ("zero", "mean"),
}
POSITIVE = {("model", "batch_size"), ("data", "n"), ("heads", "shots"), ("heads", "n_score"), ("flow", "shots"),
            ("flow", "n"), ("flow", "width")}


def quick_config() -> StudyConfig:
    """A smoke-test study: one task, few queries, few resamples (a few minutes on a laptop CPU)."""
    return StudyConfig(
        data=DataSection(tasks=["sentiment"], n=24),
        geometry=GeometrySection(n_boot=100, n_boot_separability=10),
        heads=HeadsSection(n_score=16),
    )


def _type_name(expected: Any) -> str:
    return "a table" if expected is dict else expected.__name__


def _check_type(name: str, value: Any, expected: Any) -> Any:
    if isinstance(expected, types.UnionType):
        for option in typing.get_args(expected):
            try:
                return _check_type(name, value, option)
            except ConfigError:
                continue
        names = " or ".join(_type_name(option) for option in typing.get_args(expected))
        raise ConfigError(f"{name} must be {names}, not {type(value).__name__} {value!r}")
    if expected is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a table of keys, not {type(value).__name__} {value!r}")
        return value
    if typing.get_origin(expected) is list:
        (item,) = typing.get_args(expected)
        if not isinstance(value, list):
            raise ConfigError(f"{name} must be a list of {item.__name__}, not {type(value).__name__} {value!r}")
        return [_check_type(f"{name}[{i}]", v, item) for i, v in enumerate(value)]
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise ConfigError(f"{name} must be {expected.__name__}, not {type(value).__name__} {value!r}")
    return value


def _section(name: str, cls: type, raw: Any, base: Any) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"[{name}] must be a table of keys, not {raw!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"unknown key {name}.{unknown[0]}; [{name}] takes {', '.join(sorted(known))}")
    values = {key: _check_type(f"{name}.{key}", value, hints[key]) for key, value in raw.items()}
    for key, value in values.items():
        allowed = CHOICES.get((name, key))
        if allowed and value not in allowed:
            raise ConfigError(f"{name}.{key} must be one of {', '.join(allowed)}, not {value!r}")
        if (name, key) in POSITIVE and value < 1:
            raise ConfigError(f"{name}.{key} must be >= 1, not {value}")
    return dataclasses.replace(base, **values)


def _validate(config: StudyConfig) -> StudyConfig:
    if not config.data.tasks:
        raise ConfigError("data.tasks is empty; name at least one built-in task or data file")
    for task in config.data.tasks:
        if task not in list_tasks() and not Path(task).suffix:
            raise ConfigError(f"data.tasks: {task!r} is neither a built-in task ({', '.join(list_tasks())}) nor a file")
    if any(k < 0 for k in config.data.shots):
        raise ConfigError(f"data.shots must be >= 0, not {config.data.shots}")
    if not config.k_values:
        raise ConfigError("data.shots has no k > 0 and heads are disabled: there is no ICL setting to analyse")
    if not 0 < config.heads.fraction < 1:
        raise ConfigError(f"heads.fraction must be between 0 and 1, not {config.heads.fraction}")
    if min(config.geometry.n_boot, config.geometry.n_boot_separability) < 0 or config.geometry.rank < 1:
        raise ConfigError("geometry.n_boot and geometry.n_boot_separability must be >= 0, geometry.rank >= 1")
    if not 0 <= config.geometry.min_rise < float("inf"):
        raise ConfigError(f"geometry.min_rise must be a finite number >= 0, not {config.geometry.min_rise}")
    _check_model_options(config.model)
    cluster = config.cluster
    if cluster.scheduler and cluster.workers:
        raise ConfigError("[cluster] takes scheduler or workers, not both")
    if min(cluster.workers, cluster.example_chunk) < 0:
        raise ConfigError("cluster.workers and cluster.example_chunk must be >= 0 (0: not set)")
    unknown_edges = sorted(set(config.flow.edges) - set(_all_edges()))
    if unknown_edges or not config.flow.edges:
        raise ConfigError(f"flow.edges: {unknown_edges or 'empty'}; choose from {', '.join(_all_edges())}")
    _check_knockouts(config.flow.knockouts)
    return config


def _check_knockouts(cells: list[str]) -> None:
    from extraction.errors import InterventionError
    from heads.errors import HeadsError
    from heads.flow import parse_cell

    for cell in cells:
        try:
            parse_cell(cell)
        except (HeadsError, InterventionError) as error:
            raise ConfigError(f"flow.knockouts: {error}") from None


def _check_model_options(model: ModelSection) -> None:
    """The model options that mean the same on every machine (devices are checked when the model loads)."""
    from extraction.errors import ModelLoadError
    from extraction.placement import check_attn_implementation
    from extraction.quantisation import quantization_config

    for key, check in (("attn_implementation", check_attn_implementation), ("quantization", quantization_config)):
        try:
            check(getattr(model, key))
        except ModelLoadError as error:
            raise ConfigError(f"model.{key}: {error}") from None


def config_from_dict(raw: dict[str, Any], base: StudyConfig | None = None) -> StudyConfig:
    """Validate a parsed configuration (sections of keys) over ``base`` (default: the defaults)."""
    config = base or StudyConfig()
    sections = {f.name: f for f in dataclasses.fields(StudyConfig)}
    unknown = sorted(set(raw) - set(sections))
    if unknown:
        raise ConfigError(f"unknown section [{unknown[0]}]; the sections are {', '.join(f'[{s}]' for s in sections)}")
    updates = {
        name: _section(name, typing.get_type_hints(StudyConfig)[name], value, getattr(config, name))
        for name, value in raw.items()
    }
    return _validate(dataclasses.replace(config, **updates))


def _parse(path: Path) -> Any:
    """The file's content as Python values (TOML, or YAML for .yaml/.yml)."""
    import yaml

    text = path.read_text()
    try:
        return yaml.safe_load(text) or {} if path.suffix in (".yaml", ".yml") else tomllib.loads(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as error:
        raise ConfigError(f"{path} cannot be parsed: {error}") from error


def load_config(path: str | Path | None, *, quick: bool = False) -> StudyConfig:
    """Read a TOML or YAML study file (None: the defaults); ``quick`` starts from :func:`quick_config`."""
    base = quick_config() if quick else StudyConfig()
    if path is None:
        return _validate(base)
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    raw = _parse(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold sections of keys, not {type(raw).__name__}")
    return config_from_dict(raw, base)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, dict):  # an inline table
        return "{" + ", ".join(f"{json.dumps(str(key))} = {_toml_value(item)}" for key, item in value.items()) + "}"
    return "[" + ", ".join(_toml_value(v) for v in value) + "]"


def dump_toml(config: Any) -> str:
    """A configuration with sections (``config.to_dict()``: the study's, or the training lab's) as TOML text that
    :func:`load_config` (or the lab's loader) reads back to an equal configuration; a section holding a list of
    tables (the lab's ``clamp``) is written as ``[[section]]`` tables."""
    lines = []
    for section, values in config.to_dict().items():
        tables = values if isinstance(values, list) else [values]  # a list of tables: [[section]] each
        for table in tables:
            lines.append(f"[[{section}]]" if isinstance(values, list) else f"[{section}]")
            lines += [f"{key} = {_toml_value(value)}" for key, value in table.items()]
            lines.append("")
    return "\n".join(lines)
