"""Fixtures: tiny randomly initialised Hugging Face causal LMs with a real word-level tokenizer, built in the test.

Each tiny model is saved to a temporary Hugging Face folder so that tests go through the same loading path as
users do. One model per tested architecture (see ``_configs``); the Gemma-3 one has grouped-query attention and
``head_dim`` different from hidden / heads.
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


def _corpus() -> list[str]:
    """The built-in datasets' texts, each followed by its label, and the template words."""
    lines = [" ".join(EXTRA_WORDS)]
    for path in sorted(DATA.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            lines.append(f"{record['text']} {record['label']}")
    return lines


def _vocabulary() -> list[str]:
    words: set[str] = set()
    for line in _corpus():
        words.update(re.findall(r"\w+|[^\w\s]", line))
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


def build_tiny_llama(folder: Path, blocks: int, heads: int = 4, kv_heads: int = 2) -> Path:
    """A tiny random Llama (hidden 64) with the word-level tokenizer, saved in ``folder`` (for the benchmarks)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    tokenizer = build_word_tokenizer(folder)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=blocks,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=2048,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def build_byte_level_tokenizer(directory: Path):
    """A byte-level BPE tokenizer trained on the built-in datasets until every word is one token (no <bos>).

    transformers pairs some model types (Qwen 2) with their own byte-level BPE tokenizer class whatever the folder's
    tokenizer config says; such a class rebuilds this tokenizer from its vocabulary and merges unchanged.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1_000_000, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(_corpus(), trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )
    tokenizer.save_pretrained(directory)
    return tokenizer


#: Tiny models whose model type transformers loads with its own byte-level BPE tokenizer class.
BYTE_LEVEL = {"qwen2"}


def _configs(vocab_size: int) -> dict:
    """One tiny config per architecture family the toolkit is tested on (2-4 layers, hidden 32-64)."""
    from transformers import (CohereConfig, GPT2Config, Gemma2Config, Gemma3TextConfig, GPTNeoXConfig,
                              GraniteConfig, LlamaConfig, MistralConfig, Phi3Config, Qwen2Config)

    common = dict(vocab_size=vocab_size, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    small = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                 max_position_embeddings=1024, **common)
    return {
        "gemma3": Gemma3TextConfig(
            hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=24, sliding_window=32, max_position_embeddings=1024,
            layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
            **common,
        ),
        "llama": LlamaConfig(num_key_value_heads=2, **small),
        "gpt2": GPT2Config(n_embd=48, n_layer=3, n_head=4, n_positions=1024, **common),
        # Every layer attends within a window shorter than the prompts.
        "mistral": MistralConfig(num_key_value_heads=2, head_dim=12, sliding_window=16, **small),
        # Bias on the q, k and v projections (not on o_proj).
        "qwen2": Qwen2Config(num_key_value_heads=2, **small),
        # Attention and final-logit soft-capping (caps low enough to bite), alternating sliding window, tied head.
        "gemma2": Gemma2Config(
            num_key_value_heads=2, head_dim=16, sliding_window=16, attn_logit_softcapping=2.0,
            final_logit_softcapping=1.5, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            **small,
        ),
        # Parallel attention and MLP, rotary on half of each head, biases everywhere, untied ``embed_out``.
        "gpt_neox": GPTNeoXConfig(
            use_parallel_residual=True,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}, **small,
        ),
        # One fused qkv_proj and one fused gate_up_proj.
        "phi3": Phi3Config(num_key_value_heads=2, **small),
        # Output scalings (read-out tests only): logits * logit_scale, logits / logits_scaling.
        "cohere": CohereConfig(num_key_value_heads=2, logit_scale=0.25, **small),
        "granite": GraniteConfig(num_key_value_heads=2, logits_scaling=4.0, **small),
    }


def _randomise_norms(model) -> None:
    """Give every norm a random gain (and bias) so that no norm is the identity map a fresh model starts with."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.ndim == 1 and re.search(r"norm|ln_", name):
                parameter.add_(0.2 * torch.randn_like(parameter))


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, Path]:
    """Folders holding tiny random models, one per tested architecture, in Hugging Face format, sharing the word
    tokenizer (the byte-level one for :data:`BYTE_LEVEL` model types)."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("tiny-models")
    words = build_word_tokenizer(root / "tokenizer")
    byte_level = build_byte_level_tokenizer(root / "byte-level-tokenizer")
    folders = {}
    for name, config in _configs(len(words)).items():
        tokenizer = byte_level if name in BYTE_LEVEL else words
        config.vocab_size = len(tokenizer)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        _randomise_norms(model)
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
