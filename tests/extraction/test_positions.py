"""Position groups on tricky tokenizations: SentencePiece (Llama-2 style), byte-level BPE and the word-level one."""

from __future__ import annotations


import numpy as np
import pytest
from transformers import AutoTokenizer

from extraction.errors import PromptError
from extraction.positions import KIND_CODES, prompt_segments, token_groups
from extraction.prompts import build_prompts, encode
from extraction.tasks import load_task
from tests.tokenizer_builders import byte_level_bpe_tokenizer, left_padded, sentencepiece_llama_tokenizer

SHOTS = 3



@pytest.fixture(scope="module", params=["sentencepiece", "byte_level", "word"])
def tokenizer(request, tiny_gemma_dir):
    if request.param == "word":
        return left_padded(AutoTokenizer.from_pretrained(tiny_gemma_dir))
    builder = sentencepiece_llama_tokenizer if request.param == "sentencepiece" else byte_level_bpe_tokenizer
    return left_padded(builder())


def _text_of(tokenizer, ids) -> str:
    return tokenizer.decode(ids).strip()


@pytest.mark.parametrize("task", ["sentiment", "topic"])
def test_groups_cover_the_parts_of_every_demonstration(tokenizer, task):
    prompts = build_prompts(load_task(task), shots=SHOTS, n=6, seed=1)
    encoded = encode(tokenizer, prompts.prompts)
    groups = encoded.groups
    assert groups.kind.shape == encoded.input_ids.shape
    assert ((groups.kind == -1) == (encoded.attention_mask == 0)).all()
    for row, prompt in enumerate(prompts.prompts):
        ids, kind, demo = encoded.input_ids[row], groups.kind[row], groups.demo[row]
        assert kind[-1] == KIND_CODES["final"]
        for i in range(SHOTS):
            y = (kind == KIND_CODES["output"]) & (demo == i)
            x = (kind == KIND_CODES["input"]) & (demo == i)
            assert _text_of(tokenizer, ids[y]) == prompts.label_words[prompt.demo_labels[i]]
            # the input's tokens spell the demonstration text (a boundary token may be shared with the template)
            assert _text_of(tokenizer, ids[x]).replace(" ", "") in load_task(task).texts[prompt.demo_indices[i]
                                                                                          ].replace(" ", "")
            # y_i is the token label_positions finds
            assert int(np.flatnonzero(y.numpy())[0]) == encoded.label_positions[row][i]
        query = kind == KIND_CODES["query"]
        assert query.any() and (demo[query] == -1).all()
        # groups come in prompt order: x_i before y_i before x_{i+1}; the query after every demonstration
        first = {(k, d): int(np.flatnonzero(((kind == KIND_CODES[k]) & (demo == d)).numpy())[0])
                 for k in ("input", "output") for d in range(SHOTS)}
        order = [first[(k, d)] for d in range(SHOTS) for k in ("input", "output")]
        assert order == sorted(order) and order[-1] < int(np.flatnonzero(query.numpy())[0])


def test_segments_rebuild_the_prompt_text():
    prompts = build_prompts(load_task("sentiment"), shots=2, n=3, seed=0)
    for prompt in prompts.prompts:
        covered = "".join(prompt.text[s.start:s.end] for s in prompt.segments)
        assert covered == prompt.text


def test_a_group_with_no_token_is_an_error_naming_it():
    text, segments = prompt_segments("{text}{label}", "\n", [("good", "positive")], "bad")
    # one token covering the whole demonstration: x_1 and y_1 share it, y_1 wins, x_1 has none
    offsets = [(0, 12), (12, 13), (13, 16)]
    with pytest.raises(PromptError, match="input group of demonstration 1 maps to no token"):
        token_groups(offsets, segments)


def test_unknown_template_field_is_refused():
    with pytest.raises(PromptError, match="unknown"):
        prompt_segments("{text} {other} {label}", "\n", [], "q")


def test_the_store_holds_each_prompts_groups(tiny_gemma, tmp_path):
    from extraction.extractor import extract

    ds = extract(tiny_gemma, tmp_path / "s.zarr", task="sentiment", shots=2, n=5, batch_size=2, progress=False)
    prompts = build_prompts(load_task("sentiment"), shots=2, n=5, seed=0)
    encoded = encode(tiny_gemma.tokenizer, prompts.prompts)
    assert ds.attrs["position_kinds"] == KIND_CODES
    kind, demo = ds["position_kind"].values, ds["position_demo"].values
    for row in range(5):
        keep = encoded.attention_mask[row].bool()
        length = int(ds["n_tokens"][row])
        assert (kind[row, :length] == encoded.groups.kind[row][keep].numpy()).all()
        assert (demo[row, :length] == encoded.groups.demo[row][keep].numpy()).all()
        assert (kind[row, length:] == -1).all() and (demo[row, length:] == -1).all()


@pytest.mark.parametrize("template, separator", [("{input} -> {output}", "\n"), ("Q: {input}\nA: {output}", "\n\n")])
def test_pair_prompts_get_groups_of_their_parts(template, separator):
    """String-to-string prompts (multi-token inputs and answers) encode with the same groups as classification ones."""
    from extraction.pair_tasks import build_pair_prompts, load_pair_task

    tokenizer = left_padded(byte_level_bpe_tokenizer())
    task = load_pair_task("country_capital", template=template, separator=separator)
    prompts = build_pair_prompts(task, shots=SHOTS, n=4, seed=2)
    encoded = encode(tokenizer, prompts)
    kind, demo = encoded.groups.kind, encoded.groups.demo
    for row, prompt in enumerate(prompts):
        assert kind[row, -1] == KIND_CODES["final"]
        for i, index in enumerate(prompt.demo_indices):
            for name, expected in (("input", task.inputs[index]), ("output", task.outputs[index])):
                mine = (kind[row] == KIND_CODES[name]) & (demo[row] == i)
                assert _text_of(tokenizer, encoded.input_ids[row][mine]) == expected
        query = (kind[row] == KIND_CODES["query"])
        assert _text_of(tokenizer, encoded.input_ids[row][query]) == task.inputs[prompt.query_index]
        template_demos = set(demo[row][kind[row] == KIND_CODES["template"]].tolist())
        assert template_demos == set(range(SHOTS)) | {-1}
