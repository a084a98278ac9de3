"""Greedy generation and accuracy on string-to-string tasks: equal to a hand loop of argmax steps, stopping, exact
match, interventions (tiny random models answer randomly, so these test the machinery), and one real-model check."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from extraction.interventions import HeadAblation, Injection
from extraction.models import load_model
from extraction.pair_eval import _continuation, _stop_ids, cut_answer, evaluate_pair_task, greedy_generate, \
    stop_strings
from extraction.pair_tasks import PairTask, build_pair_prompts, load_pair_task

#: Words the tiny word-level tokenizer knows (tests/conftest.py), so its prompts have no unknown tokens.
WORDS = ("positive", "negative", "yes", "no", "Topic", "Type", "Question", "Article", "Answer", "Sentiment")


def word_task() -> PairTask:
    inputs = WORDS
    outputs = WORDS[1:] + WORDS[:1]
    return PairTask("words", inputs, outputs, np.arange(6), np.arange(6, 10), template="{input} : {output}")


def task_for(name: str) -> PairTask:
    """Built-in data for the byte-level tokenizer; words it knows for the word-level one."""
    return load_pair_task("country_capital") if name == "qwen2" else word_task()


@torch.no_grad()
def hand_loop(loaded, text: str, steps: int) -> list[int]:
    """Greedy decoding of one prompt, one full forward pass per token, no batching, padding or cache."""
    ids = loaded.tokenizer(text, return_tensors="pt")["input_ids"]
    written = []
    for _ in range(steps):
        token = int(loaded.model(input_ids=ids).logits[0, -1].argmax())
        if token in _stop_ids(loaded):
            break
        written.append(token)
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return written


@pytest.fixture(scope="module", params=["gemma3", "qwen2", "gpt2", "mistral"])
def tiny(request, tiny_model_dirs):
    return request.param, load_model(str(tiny_model_dirs[request.param]))


def test_cut_answer():
    stops = stop_strings("\n")
    assert stops == ("\n",) and stop_strings(" | ") == (" | ", "\n") and stop_strings("") == ("\n",)
    assert cut_answer(" Paris\nQ: France", stops) == ("Paris", True)
    assert cut_answer("\n\n Kuala Lumpur \n", stops) == ("Kuala Lumpur", True)  # leading newlines are not a stop
    assert cut_answer(" New Del", stops) == ("New Del", False)
    assert cut_answer(" Oslo | x", stop_strings(" | ")) == ("Oslo", True)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_greedy_generation_equals_a_hand_loop(tiny, batch_size):
    name, loaded = tiny
    # 5 shots: prompts and answers run past the sliding windows of the tiny gemma3 (32) and mistral (16) models.
    prompts = build_pair_prompts(task_for(name), shots=5, n=4, seed=2)
    made = greedy_generate(loaded, prompts, stops=(), max_new_tokens=5, batch_size=batch_size)
    for prompt, generation in zip(prompts, made):
        expected = hand_loop(loaded, prompt.text, 5)
        assert list(generation.tokens) == expected
        assert generation.first_token == (expected[0] if expected else generation.first_token)
        ids = loaded.tokenizer(prompt.text)["input_ids"]
        assert generation.text == _continuation(loaded.tokenizer, ids, expected).strip()


def test_interventions_use_full_passes_that_equal_the_cached_ones(tiny):
    name, loaded = tiny
    prompts = build_pair_prompts(task_for(name), shots=5, n=4, seed=2)
    noop = Injection(torch.zeros(loaded.arch.hidden_size), layer=0)  # forces the uncached path, changes nothing
    clean = greedy_generate(loaded, prompts, stops=(), max_new_tokens=4, batch_size=4, track=[[5, 7]] * 4)
    full = greedy_generate(loaded, prompts, stops=(), max_new_tokens=4, batch_size=4, track=[[5, 7]] * 4,
                           interventions=[noop])
    assert [g.tokens for g in clean] == [g.tokens for g in full]
    np.testing.assert_allclose([g.tracked_logits for g in clean], [g.tracked_logits for g in full], atol=1e-4)


@torch.no_grad()
def knocked_out_hand_loop(loaded, prompt, knockout, steps: int) -> tuple[list[int], float]:
    """Greedy decoding of one unpadded prompt under an edge knockout, one full pass per token; the written tokens
    belong to the final group. Returns the tokens and the first step's logit of token 5."""
    from extraction.interventions import Batch
    from extraction.positions import FINAL, PositionGroups
    from extraction.prompts import encode

    encoded = encode(loaded.tokenizer, [prompt])
    ids, kind, demo = encoded.input_ids, encoded.groups.kind, encoded.groups.demo
    written, first_logit = [], None
    for _ in range(steps):
        groups = PositionGroups(torch.cat([kind, torch.full((1, len(written)), FINAL, dtype=kind.dtype)], 1),
                                torch.cat([demo, torch.full((1, len(written)), -1, dtype=demo.dtype)], 1))
        with knockout.applied(loaded, Batch(ids, torch.ones_like(ids), groups)):
            logits = loaded.model(input_ids=ids).logits[0, -1]
        first_logit = float(logits[5]) if first_logit is None else first_logit
        written.append(int(logits.argmax()))
        ids = torch.cat([ids, torch.tensor([[written[-1]]])], dim=1)
    return written, first_logit


@pytest.mark.parametrize("edge", ["y->final", "query->final"])
def test_generation_under_an_edge_knockout_equals_a_hand_loop(tiny_model_dirs, edge):
    """Batched, padded generation under a knockout: the written tokens stay receivers of edges into the final group."""
    from extraction.edges import EdgeKnockout

    loaded = load_model(str(tiny_model_dirs["qwen2"]))
    prompts = build_pair_prompts(task_for("qwen2"), shots=3, n=4, seed=2)
    knockout = EdgeKnockout(edge, blocks=[0, 1])
    knockout.check(loaded.arch)
    made = greedy_generate(loaded, prompts, stops=(), max_new_tokens=3, batch_size=4, interventions=[knockout],
                           track=[[5]] * 4)
    clean = greedy_generate(loaded, prompts, stops=(), max_new_tokens=3, batch_size=4, track=[[5]] * 4)
    for prompt, generation in zip(prompts, made):
        tokens, logit = knocked_out_hand_loop(loaded, prompt, knockout, 3)
        assert list(generation.tokens) == tokens
        assert generation.tracked_logits[0] == pytest.approx(logit, abs=1e-4)
    assert not np.allclose([g.tracked_logits for g in made], [g.tracked_logits for g in clean], atol=1e-4)


def test_generation_stops_at_a_stop_string_and_at_end_of_sequence(tiny_model_dirs, monkeypatch):
    loaded = load_model(str(tiny_model_dirs["qwen2"]))
    prompts = build_pair_prompts(task_for("qwen2"), shots=2, n=6, seed=3)
    free = greedy_generate(loaded, prompts, stops=(), max_new_tokens=4)
    assert not any(g.stopped for g in free) and all(len(g.tokens) == 4 for g in free)
    tested = 0
    for prompt, generation in zip(prompts, free):
        ids = loaded.tokenizer(prompt.text)["input_ids"]
        one, two = (_continuation(loaded.tokenizer, ids, list(generation.tokens[:k])) for k in (1, 2))
        stop = two[len(one):].strip()
        if not stop or not one.strip() or stop in one.lstrip():
            continue
        made = greedy_generate(loaded, [prompt], stops=(stop,), max_new_tokens=4)[0]
        assert made.stopped and made.tokens == generation.tokens[:2] and made.text == cut_answer(two, (stop,))[0]
        tested += 1
    assert tested >= 2
    target = free[0].tokens[1]
    monkeypatch.setattr(loaded.model.generation_config, "eos_token_id", target)
    made = greedy_generate(loaded, prompts[:1], stops=(), max_new_tokens=4)[0]
    expected = list(free[0].tokens[:free[0].tokens.index(target)])
    assert made.stopped and list(made.tokens) == expected


def test_exact_match_and_first_token_against_answers_set_to_the_models_own(tiny_model_dirs):
    loaded = load_model(str(tiny_model_dirs["qwen2"]))
    task = load_pair_task("country_capital")
    before = evaluate_pair_task(loaded, task, shots=2, n=6, seed=4, max_new_tokens=4)
    assert len(before.results) == 6 and before.config["shots"] == 2 and before.interventions == []
    assert before.exact_accuracy == np.mean([r.generated == r.answer for r in before.results])
    assert before.first_token_accuracy == np.mean([r.predicted_token == r.answer_token for r in before.results])
    outputs = list(task.outputs)
    for r in before.results:
        outputs[r.query_index] = r.generated if r.generated else outputs[r.query_index]
    own = dataclasses.replace(task, outputs=tuple(outputs))
    after = evaluate_pair_task(loaded, own, shots=2, n=6, seed=4, max_new_tokens=4)
    replaced = [r.generated != "" for r in before.results]
    assert sum(replaced) >= 3
    assert all(r.exact for r, swap in zip(after.results, replaced) if swap)
    frame = after.to_frame()
    assert len(frame) == 6 and {"input", "answer", "generated", "exact", "first_correct"} <= set(frame.columns)


def test_first_token_only(tiny_model_dirs):
    loaded = load_model(str(tiny_model_dirs["gemma3"]))
    result = evaluate_pair_task(loaded, word_task(), shots=3, n=4, generate=False)
    assert result.exact_accuracy is None and all(r.generated is None for r in result.results)
    assert result.config["max_new_tokens"] == 1


def test_readings_of_an_ambiguous_task(tiny_model_dirs):
    loaded = load_model(str(tiny_model_dirs["qwen2"]))
    result = evaluate_pair_task(loaded, "ambiguous_past_copying", shots=4, n=5)
    accuracy = result.reading_accuracy()
    assert set(accuracy) == {"past_tense", "copying"}
    for r in result.results:
        assert r.readings_exact["past_tense"] == r.exact
        assert r.readings_exact["copying"] == (r.generated == r.input)
    assert accuracy["copying"]["exact"] == np.mean([r.generated == r.input for r in result.results])
    frame = result.to_frame()
    assert {"first_past_tense", "exact_copying"} <= set(frame.columns)


def test_interventions_are_applied_and_recorded(tiny_model_dirs):
    loaded = load_model(str(tiny_model_dirs["gemma3"]))
    ablation = HeadAblation([(0, 0), (0, 1), (1, 2)])
    clean = evaluate_pair_task(loaded, word_task(), shots=3, n=4, max_new_tokens=3)
    ablated = evaluate_pair_task(loaded, word_task(), shots=3, n=4, max_new_tokens=3, intervention=ablation)
    with ablation.applied(loaded):
        by_hand = evaluate_pair_task(loaded, word_task(), shots=3, n=4, max_new_tokens=3)
    assert ablated.interventions == [ablation.describe()]
    logits = [[r.answer_logit for r in e.results] for e in (clean, ablated, by_hand)]
    np.testing.assert_allclose(logits[1], logits[2], atol=1e-5)
    assert not np.allclose(logits[0], logits[1], atol=1e-4)
    assert [r.generated for r in ablated.results] == [r.generated for r in by_hand.results]


@pytest.mark.real_model
def test_real_model_learns_capitalization_in_context(real_model):
    result = evaluate_pair_task(real_model, "capitalization", shots=8, n=16, batch_size=16)
    # Chance is about 0 for a 262k-token vocabulary.
    assert result.first_token_accuracy >= 0.5 and result.exact_accuracy >= 0.5, result.to_frame()
