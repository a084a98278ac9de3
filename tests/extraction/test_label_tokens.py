"""Label tokens are read from the tokenized prompts, on real subword tokenizers.

Three tokenizers: a SentencePiece BPE model trained here and wrapped like Llama 2's published ``tokenizer.json``
(legacy prefix space: a lone " positive" is ['▁', '▁positive']), a GPT-2 style byte-level BPE trained here, and the
default model's (Gemma 3) real tokenizer.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from extraction.errors import LabelWordError
from extraction.prompts import PromptSet, build_prompts, encode, label_token_ids
from extraction.tasks import list_tasks, load_task
from tests.tokenizer_builders import byte_level_bpe_tokenizer, left_padded, sentencepiece_llama_tokenizer

BUILDERS = {"sentencepiece": sentencepiece_llama_tokenizer, "byte_level": byte_level_bpe_tokenizer}



@pytest.fixture(scope="module")
def sentencepiece():
    return left_padded(sentencepiece_llama_tokenizer())


@pytest.fixture(scope="module",
                params=["sentencepiece", "byte_level", pytest.param("gemma", marks=pytest.mark.real_model)])
def tokenizer(request):
    if request.param == "gemma":
        return left_padded(request.getfixturevalue("real_tokenizer"))
    return left_padded(BUILDERS[request.param]())


def _in_context(tokenizer, prompts: PromptSet, word: str) -> int:
    """The token the model writes after a query when it answers ``word`` (the last token of query + answer)."""
    query = prompts.prompts[0].text
    answer = prompts.label_space + word
    return tokenizer(query + answer, add_special_tokens=False)["input_ids"][-1]


def _check(tokenizer, prompts: PromptSet) -> list[int]:
    """Label tokens are distinct, are the words' own tokens in context, and sit at every demonstration position."""
    ids = label_token_ids(tokenizer, prompts)
    assert len(set(ids)) == len(prompts.label_words)
    for word, token in zip(prompts.label_words, ids):
        assert tokenizer.decode([token]).strip() == word
        assert token == _in_context(tokenizer, prompts, word)
    encoded = encode(tokenizer, prompts.prompts)
    for row, prompt in enumerate(prompts.prompts):
        for (start, end), label in zip(prompt.label_spans, prompt.demo_labels):
            assert prompt.text[start:end] == prompts.label_words[label]
        found = encoded.input_ids[row, encoded.label_positions[row]].tolist()
        assert found == [ids[label] for label in prompt.demo_labels]
    return ids


def test_the_llama_style_tokenizer_gives_a_bare_prefix_space(sentencepiece):
    lone = sentencepiece(" positive", add_special_tokens=False)["input_ids"]
    assert sentencepiece.convert_ids_to_tokens(lone) == ["▁", "▁positive"]
    in_context = sentencepiece("Sentiment: positive", add_special_tokens=False)["input_ids"]
    assert sentencepiece.convert_ids_to_tokens(in_context)[-1] == "▁positive"


@pytest.mark.parametrize("name", list_tasks())
def test_builtin_tasks_get_their_words_tokens(tokenizer, name):
    task = load_task(name)
    sampling = "balanced" if task.n_classes <= 4 else "uniform"
    ids = _check(tokenizer, build_prompts(task, shots=4, n=6, sampling=sampling))
    assert label_token_ids(tokenizer, build_prompts(task, shots=0, n=2)) == ids  # zero-shot: the same tokens


def test_symbolic_labels(tokenizer):
    prompts = build_prompts(load_task("topic"), shots=8, n=4, label_mode="symbolic")
    assert prompts.label_words == ("@", "#", "$", "%")
    _check(tokenizer, prompts)


@pytest.mark.parametrize("template", ["{text} Sentiment: {label}\n", "{text} Sentiment: {label} "])
@pytest.mark.parametrize("label_mode", ["words", "symbolic"])
def test_template_ending_in_whitespace(tokenizer, template, label_mode):
    task = load_task("sentiment")
    plain = label_token_ids(tokenizer, build_prompts(task, shots=3, n=4, label_mode=label_mode))
    assert _check(tokenizer, build_prompts(task, shots=3, n=4, template=template, label_mode=label_mode)) == plain


@pytest.mark.parametrize("separator", [" | ", "\n\n", " "])
@pytest.mark.parametrize("label_mode", ["words", "symbolic"])
def test_separators(tokenizer, separator, label_mode):
    task = load_task("sentiment")
    plain = label_token_ids(tokenizer, build_prompts(task, shots=3, n=4, label_mode=label_mode))
    assert _check(tokenizer, build_prompts(task, shots=3, n=4, separator=separator, label_mode=label_mode)) == plain


def test_a_demonstration_whose_label_token_differs_is_named(tokenizer):
    prompts = build_prompts(load_task("sentiment"), shots=3, n=4)
    prompt = prompts.prompts[2]
    start, _ = prompt.label_spans[1]
    # glue the second demonstration's label to the template text before it: its token there is no longer the word's
    text = prompt.text[: start - 1] + "x" + prompt.text[start:]
    broken = replace(prompts, prompts=[*prompts.prompts[:2], replace(prompt, text=text), *prompts.prompts[3:]])
    word = prompts.label_words[prompt.demo_labels[1]]
    expected = tokenizer.convert_ids_to_tokens(label_token_ids(tokenizer, prompts))[prompt.demo_labels[1]]
    with pytest.raises(LabelWordError, match=(
        rf"label word '{word}' is token '{expected}' but demonstration 2 of prompt 2 \(query {prompt.query_index}\) "
        rf"has '.+' there"
    )):
        label_token_ids(tokenizer, broken)


def test_a_label_token_running_into_the_separator_is_refused(tokenizer):
    # "pos" + separator "itive\n" reads " positive": the token at the label covers separator characters
    prompts = build_prompts(load_task("sentiment"), shots=2, n=2, label_words=("neg", "pos"), separator="itive\n")
    with pytest.raises(LabelWordError, match=r"label word '(neg|pos)'.*runs into the text after it \('itive"):
        label_token_ids(tokenizer, prompts)


def test_a_bare_prefix_space_token_is_refused_or_collides(sentencepiece):
    # '+' and '=' never occur in the training corpus: in context they are '▁' then a byte token
    prompts = build_prompts(load_task("sentiment"), shots=2, n=2, label_words=("+", "="))
    with pytest.raises(LabelWordError, match=r"several tokens: '\+' -> 2 tokens \['▁', '<0x2B>'\]"):
        label_token_ids(sentencepiece, prompts)
    allowed = build_prompts(load_task("sentiment"), shots=2, n=2, label_words=("+", "="), allow_multitoken_labels=True)
    with pytest.raises(LabelWordError, match=r"'\+' and '=' share their first token '▁'"):
        label_token_ids(sentencepiece, allowed)


def test_extraction_with_the_llama_style_tokenizer(tmp_path):
    """End to end on a tiny random Llama whose vocabulary is the SentencePiece model's."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from extraction.extractor import extract
    from extraction.models import load_model

    folder = tmp_path / "llama-sp"
    tokenizer = sentencepiece_llama_tokenizer(folder)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    loaded = load_model(str(folder))
    lone = loaded.tokenizer(" positive", add_special_tokens=False)["input_ids"]
    assert loaded.tokenizer.convert_ids_to_tokens(lone) == ["▁", "▁positive"]
    ds = extract(loaded, tmp_path / "s.zarr", task="sentiment", shots=3, n=6, batch_size=4, progress=False)
    assert loaded.tokenizer.convert_ids_to_tokens(ds["label_token"].values.tolist()) == ["▁negative", "▁positive"]
    expected = ds["pred_token"].values == ds["label_token"].values[ds["label"].values]
    assert np.array_equal(ds["correct"].values, expected)
