"""An extraction tokenizes each prompt once, and batches padded from those tokens equal the tokenizer's own padding."""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest
import torch

from extraction.extractor import extract
from extraction.positions import batch_groups
from extraction.prompts import build_prompts, encode
from extraction.tasks import load_task
from heads.prompting import prompt_batches
from tests.tokenizer_builders import byte_level_bpe_tokenizer, left_padded, sentencepiece_llama_tokenizer


class CountingTokenizer:
    """A tokenizer that counts how often each text is tokenized (everything else goes to the wrapped one)."""

    def __init__(self, tokenizer):
        self.wrapped, self.seen = tokenizer, Counter()

    def __call__(self, texts, *args, **kwargs):
        self.seen.update([texts] if isinstance(texts, str) else texts)
        return self.wrapped(texts, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.wrapped, name)


@pytest.mark.parametrize("example_chunk", [None, 5])
def test_an_extraction_tokenizes_each_prompt_once(tiny_gemma, tmp_path, example_chunk):
    counting = CountingTokenizer(tiny_gemma.tokenizer)
    loaded = dataclasses.replace(tiny_gemma, tokenizer=counting)
    ds = extract(loaded, tmp_path / "s.zarr", shots=3, n=12, batch_size=4, example_chunk=example_chunk,
                 progress=False)
    prompts = [str(text) for text in ds["prompt"].values]
    assert {text: counting.seen[text] for text in prompts} == {text: 1 for text in prompts}


@pytest.fixture(scope="module", params=["word", "sentencepiece", "byte_level"])
def tokenizer(request):
    if request.param == "word":
        return request.getfixturevalue("tiny_gemma").tokenizer
    builder = {"sentencepiece": sentencepiece_llama_tokenizer, "byte_level": byte_level_bpe_tokenizer}
    return left_padded(builder[request.param]())


def test_encoded_batches_equal_the_tokenizers_own_padding(tokenizer):
    prompts = build_prompts(load_task("sentiment"), shots=3, n=6, seed=2).prompts
    encoded = encode(tokenizer, prompts)
    own = tokenizer([p.text for p in prompts], padding=True, return_tensors="pt", return_offsets_mapping=True)
    assert len(set(own["attention_mask"].sum(dim=1).tolist())) > 1  # the batch is really padded
    assert torch.equal(encoded.input_ids, own["input_ids"])
    assert torch.equal(encoded.attention_mask, own["attention_mask"])
    assert encoded.input_ids.dtype == own["input_ids"].dtype
    expected = batch_groups(own["offset_mapping"], own["attention_mask"], [p.segments for p in prompts])
    assert torch.equal(encoded.groups.kind, expected.kind) and torch.equal(encoded.groups.demo, expected.demo)
    for row, prompt in enumerate(prompts):
        offsets = own["offset_mapping"][row].tolist()
        starts = [next(i for i, (a, b) in enumerate(offsets) if b > a and b > start and a < end)
                  for start, end in prompt.answer_spans]
        assert encoded.label_positions[row] == starts


def test_the_heads_prompt_batches_tokenize_each_prompt_once(tiny_gemma):
    counting = CountingTokenizer(tiny_gemma.tokenizer)
    batches = prompt_batches(dataclasses.replace(tiny_gemma, tokenizer=counting), task="sentiment", shots=3, n=10,
                             seed=0, batch_size=4)
    prompts = [p.text for p in batches.prompts.prompts]
    assert {text: counting.seen[text] for text in prompts} == {text: 1 for text in prompts}
    again = prompt_batches(tiny_gemma, task="sentiment", shots=3, n=10, seed=0, batch_size=4)
    for (index, encoded), (same, expected) in zip(batches.batches, again.batches):
        assert index.tolist() == same.tolist() and torch.equal(encoded.input_ids, expected.input_ids)
