"""Fixtures: tiny randomly initialised Hugging Face causal LMs with a real word-level tokenizer, built in the test.

Each tiny model is saved to a temporary Hugging Face folder so that tests go through the same loading path as
users do. The Gemma-3 one has grouped-query attention and ``head_dim`` different from hidden / heads.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

DATA = Path(__file__).resolve().parents[1] / "extraction" / "data"
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
EXTRA_WORDS = "Sentiment Type Topic Question Article Answer is a : ? . , @ # positive negative yes no".split()


def _vocabulary() -> list[str]:
    words: set[str] = set(EXTRA_WORDS)
    for path in sorted(DATA.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            words.update(re.findall(r"\w+|[^\w\s]", f"{record['text']} {record['label']}"))
    return SPECIALS + sorted(words)


def build_word_tokenizer(directory: Path):
    """A word-level fast tokenizer over the built-in datasets' words (prepends <bos>, as Gemma and Llama do)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(_vocabulary())}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )
    tokenizer.save_pretrained(directory)
    return tokenizer


def _configs(vocab_size: int) -> dict:
    from transformers import GPT2Config, Gemma3TextConfig, LlamaConfig

    common = dict(vocab_size=vocab_size, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return {
        "gemma3": Gemma3TextConfig(
            hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=24, sliding_window=32, max_position_embeddings=1024,
            layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
            **common,
        ),
        "llama": LlamaConfig(
            hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024, **common,
        ),
        "gpt2": GPT2Config(n_embd=48, n_layer=3, n_head=4, n_positions=1024, **common),
    }


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, Path]:
    """Folders holding tiny random models (gemma3, llama, gpt2) in Hugging Face format, sharing one tokenizer."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("tiny-models")
    tokenizer = build_word_tokenizer(root / "tokenizer")
    folders = {}
    for name, config in _configs(len(tokenizer)).items():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        folder = root / name
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders[name] = folder
    return folders


@pytest.fixture(scope="session")
def tiny_gemma_dir(tiny_model_dirs) -> Path:
    return tiny_model_dirs["gemma3"]


@pytest.fixture(scope="session")
def tiny_gemma(tiny_gemma_dir):
    """The tiny Gemma-3 model loaded through ``extraction.load_model`` (float32, eval mode)."""
    from extraction.models import load_model

    return load_model(str(tiny_gemma_dir))


@pytest.fixture(scope="session")
def real_model():
    """The real default model (Gemma 3 270M); converted once and cached."""
    from extraction.models import load_model

    return load_model()


@pytest.fixture(scope="session")
def real_tokenizer():
    """The default model's tokenizer alone (from the converted cache)."""
    from transformers import AutoTokenizer

    from extraction.models import resolve_spec

    source, _ = resolve_spec(None)
    return AutoTokenizer.from_pretrained(source)
