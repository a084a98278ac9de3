import json

import numpy as np
import pytest

from extraction.errors import LabelWordError, PromptError, TaskError
from extraction.prompts import build_prompts, encode, label_token_ids
from extraction.tasks import list_tasks, load_task


@pytest.mark.parametrize("name", list_tasks())
def test_builtin_tasks_are_large_balanced_and_split(name):
    task = load_task(name)
    assert len(task.texts) >= 300
    assert len(set(task.train) & set(task.test)) == 0
    counts = np.bincount(task.labels, minlength=task.n_classes)
    assert counts.min() == counts.max()
    assert set(task.labels[task.train]) == set(task.labels[task.test]) == set(range(task.n_classes))


@pytest.mark.real_model
def test_builtin_label_words_are_single_distinct_tokens_for_the_default_model(real_tokenizer):
    for name in list_tasks():
        task = load_task(name)
        ids = label_token_ids(real_tokenizer, build_prompts(task, shots=4, n=4))
        assert len(set(ids)) == task.n_classes


def test_prompts_are_seeded_and_record_demonstrations():
    task = load_task("sentiment")
    first = build_prompts(task, shots=4, n=10, seed=3)
    again = build_prompts(task, shots=4, n=10, seed=3)
    other = build_prompts(task, shots=4, n=10, seed=4)
    assert [p.text for p in first.prompts] == [p.text for p in again.prompts]
    assert [p.text for p in first.prompts] != [p.text for p in other.prompts]
    for prompt in first.prompts:
        assert len(prompt.demo_indices) == 4 and set(prompt.demo_indices) <= set(task.train.tolist())
        assert prompt.query_index in set(task.test.tolist())
        assert prompt.text.endswith("Sentiment:")
        for (start, end), label in zip(prompt.label_spans, prompt.demo_labels):
            assert prompt.text[start:end] == first.label_words[label]


def test_balanced_sampling_gives_equal_class_counts():
    task = load_task("topic")
    for prompt in build_prompts(task, shots=8, n=5, sampling="balanced").prompts:
        assert np.bincount(prompt.demo_labels, minlength=4).tolist() == [2, 2, 2, 2]


def test_zero_shot_symbolic_and_random_label_modes():
    task = load_task("sentiment")
    zero = build_prompts(task, shots=0, n=3)
    assert all(p.demo_indices == () and p.text.count("Sentiment:") == 1 for p in zero.prompts)
    symbolic = build_prompts(task, shots=4, n=3, label_mode="symbolic")
    assert symbolic.label_words == ("@", "#")
    assert "Sentiment: @" in symbolic.prompts[0].text or "Sentiment: #" in symbolic.prompts[0].text
    shuffled = build_prompts(task, shots=8, n=40, label_mode="random", seed=1)
    true = np.concatenate([task.labels[list(p.demo_indices)] for p in shuffled.prompts])
    shown = np.concatenate([p.demo_labels for p in shuffled.prompts])
    assert 0.3 < (true == shown).mean() < 0.7


def test_encode_finds_label_tokens(tiny_gemma):
    prompts = build_prompts(load_task("sentiment"), shots=3, n=4).prompts
    encoded = encode(tiny_gemma.tokenizer, prompts)
    words = {"positive", "negative"}
    for row, positions in enumerate(encoded.label_positions):
        assert len(positions) == 3
        assert {tiny_gemma.tokenizer.decode(encoded.input_ids[row, p]).strip() for p in positions} <= words


def test_unknown_task_lists_the_choices():
    with pytest.raises(TaskError, match="unknown task 'sentimnet'.*sentiment"):
        load_task("sentimnet")


def test_file_with_missing_columns(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("sentence,label\nhello,a\n")
    with pytest.raises(TaskError, match="missing column.*text"):
        load_task(str(path))


def test_class_with_no_examples_in_a_pool(tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [{"text": f"t{i}", "label": "a" if i % 2 else "b", "split": "train"} for i in range(10)]
    rows += [{"text": f"q{i}", "label": "a", "split": "test"} for i in range(4)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(TaskError, match="class.*b.*no examples in the query"):
        load_task(str(path))


def test_user_file_without_split_gets_a_fixed_stratified_split(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("text,label\n" + "\n".join(f"text {i},{'yes' if i % 2 else 'no'}" for i in range(50)))
    task = load_task(str(path), template="{text} Answer: {label}")
    assert task.classes == ("no", "yes") and len(task.train) == 30 and len(task.test) == 20
    assert np.array_equal(task.train, load_task(str(path)).train)


def test_k_larger_than_the_pool():
    task = load_task("sentiment")
    shots = len(task.train) + 1
    with pytest.raises(PromptError, match=f"shots={shots}.*{len(task.train)}"):
        build_prompts(task, shots=shots, n=2)


def test_n_larger_than_the_query_pool():
    task = load_task("sentiment")
    n = len(task.test) + 1
    with pytest.raises(PromptError, match=f"n={n}.*{len(task.test)}"):
        build_prompts(task, shots=2, n=n)


def test_colliding_label_words_are_named(tiny_gemma):
    # Both words are out of the tiny vocabulary, so both start with the <unk> token.
    prompts = build_prompts(load_task("sentiment"), shots=2, n=2, label_words=("zzfoo", "zzbar"))
    with pytest.raises(LabelWordError, match="'zzfoo' and 'zzbar' share their first token"):
        label_token_ids(tiny_gemma.tokenizer, prompts)


def test_multitoken_label_words_are_reported_unless_allowed(tiny_gemma):
    task = load_task("sentiment")
    with pytest.raises(LabelWordError, match="several tokens.*'very good'"):
        label_token_ids(tiny_gemma.tokenizer, build_prompts(task, shots=2, n=2, label_words=("very good", "bad")))
    allowed = build_prompts(task, shots=2, n=2, label_words=("very good", "bad"), allow_multitoken_labels=True)
    ids = label_token_ids(tiny_gemma.tokenizer, allowed)
    assert ids[0] == tiny_gemma.tokenizer(" very", add_special_tokens=False)["input_ids"][0]


def test_bad_prompt_options():
    with pytest.raises(PromptError, match="sampling"):
        build_prompts(load_task("sentiment"), sampling="stratified")
    with pytest.raises(PromptError, match="label words given"):
        build_prompts(load_task("sentiment"), label_words=("a", "b", "c"))
