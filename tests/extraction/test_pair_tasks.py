"""String-to-string tasks: the shipped pair files' rules, loading users' files, prompt spans and answer tokens."""

from __future__ import annotations

import json

import pytest

from extraction.errors import AnswerTokenError, PromptError, TaskError
from extraction.pair_tasks import (PAIR_TASKS, PairPrompt, assemble_pair_prompt, answer_tokens, build_pair_prompts,
                                   load_pair_task)

MIN_PAIRS = 200
AMBIGUOUS = {"ambiguous_past_copying": ("past_tense", "copying"),
             "ambiguous_capitalization_copying": ("capitalization", "copying")}
PLAIN = sorted(set(PAIR_TASKS) - set(AMBIGUOUS))
RULES = {"capitalization": lambda x: x[0].upper() + x[1:], "copying": lambda x: x}


# --- the shipped data ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", PLAIN)
def test_plain_tasks_have_enough_distinct_pairs_in_two_pools(name):
    task = load_pair_task(name)
    assert len(task.inputs) >= MIN_PAIRS
    assert len(set(task.inputs)) == len(task.inputs), "duplicate inputs"
    assert not set(task.train) & set(task.test) and len(task.train) + len(task.test) == len(task.inputs)
    assert min(len(task.train), len(task.test)) >= MIN_PAIRS // 2


@pytest.mark.parametrize("name", sorted(PAIR_TASKS))
def test_pairs_are_clean_ascii(name):
    task = load_pair_task(name)
    texts = [*task.inputs, *task.outputs, *(v for values in task.readings.values() for v in values)]
    bad = [t for t in texts if not t or not t.isascii() or not t.isprintable() or t != t.strip()]
    assert bad == []


@pytest.mark.parametrize("name", sorted(RULES))
def test_rule_tasks_follow_their_rule(name):
    task = load_pair_task(name)
    assert all(out == RULES[name](x) for x, out in zip(task.inputs, task.outputs))
    if name == "capitalization":
        assert all(x.islower() for x in task.inputs)


@pytest.mark.parametrize("name", sorted(AMBIGUOUS))
def test_ambiguous_demonstrations_fit_both_tasks_and_queries_separate_them(name):
    task = load_pair_task(name)
    assert tuple(task.readings) == AMBIGUOUS[name]
    assert task.outputs == task.readings[AMBIGUOUS[name][0]]
    for reading in AMBIGUOUS[name]:  # every reading is its task's answer
        source = load_pair_task(reading)
        known = dict(zip(source.inputs, source.outputs))
        rule = RULES.get(reading, known.get)
        assert all(out == rule(x) for x, out in zip(task.inputs, task.readings[reading])), reading
    first, second = (task.readings[r] for r in AMBIGUOUS[name])
    assert all(first[i] == second[i] for i in task.train), "a demonstration that only one task explains"
    assert all(first[i] != second[i] for i in task.test), "a query that does not tell the tasks apart"
    assert len(task.train) >= 30 and len(task.test) >= MIN_PAIRS
    assert len(set(task.inputs)) == len(task.inputs)


# --- users' files and errors -------------------------------------------------------------------------------------

ROWS = [{"input": f"w{i}", "output": f"W{i}"} for i in range(10)]


def test_user_csv_and_jsonl_load_the_same_way(tmp_path):
    import pandas as pd

    pd.DataFrame(ROWS).to_csv(tmp_path / "mine.csv", index=False)
    (tmp_path / "mine.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    csv, jsonl = load_pair_task(str(tmp_path / "mine.csv")), load_pair_task(str(tmp_path / "mine.jsonl"))
    assert csv.name == "mine" and csv.inputs == jsonl.inputs and csv.outputs == jsonl.outputs
    assert list(csv.train) == list(jsonl.train) and len(csv.train) == 6 and len(csv.test) == 4


def test_user_parquet_loads(tmp_path):
    pytest.importorskip("pyarrow")
    import pandas as pd

    pd.DataFrame(ROWS).to_parquet(tmp_path / "mine.parquet")
    assert load_pair_task(str(tmp_path / "mine.parquet")).outputs == tuple(r["output"] for r in ROWS)


def test_a_split_column_is_kept(tmp_path):
    rows = [{**r, "split": "train" if i < 8 else "test"} for i, r in enumerate(ROWS)]
    (tmp_path / "s.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = load_pair_task(str(tmp_path / "s.jsonl"))
    assert list(task.train) == list(range(8)) and list(task.test) == [8, 9]


@pytest.mark.parametrize("rows, message", [
    ([{"text": "a", "label": "b"}] * 4, "missing column.*input.*output.*needs an 'input' and an 'output' column"),
    ([{"input": "a", "output": " "}] + ROWS, "1 empty output"),
    ([{"input": "", "output": "x"}] + ROWS, "1 empty input"),
    ([{**r, "split": "dev"} for r in ROWS], "split values must be 'train' or 'test'"),
    ([{**r, "split": "train"} for r in ROWS], "no examples in the query"),
])
def test_bad_user_files_are_refused_in_one_line(tmp_path, rows, message):
    import pandas as pd

    path = tmp_path / "bad.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    with pytest.raises(TaskError, match=message) as error:
        load_pair_task(str(path))
    assert "\n" not in str(error.value)


def test_unknown_task_and_bad_templates_are_refused():
    with pytest.raises(TaskError, match="unknown pair task 'nope'.*capitalization"):
        load_pair_task("nope")
    with pytest.raises(TaskError, match="must contain"):
        load_pair_task("copying", template="{input} ->")
    with pytest.raises(TaskError, match="end with '{output}'"):
        load_pair_task("copying", template="{input} -> {output}.")


def test_prompt_sizes_are_checked():
    with pytest.raises(PromptError, match="shots=500 but the demonstration pool"):
        build_pair_prompts(load_pair_task("copying"), shots=500)
    with pytest.raises(PromptError, match="n=999 but the query pool"):
        build_pair_prompts(load_pair_task("copying"), n=999)


# --- prompts and their spans -------------------------------------------------------------------------------------

@pytest.mark.parametrize("template, separator", [("{input} -> {output}", "\n"), ("Q: {input}\nA: {output}", "\n\n"),
                                                 ("{input}\t{output}", " | ")])
def test_spans_cover_exactly_their_parts(template, separator):
    task = load_pair_task("country_capital", template=template, separator=separator)
    prompts = build_pair_prompts(task, shots=3, n=4, seed=1)
    assert prompts == build_pair_prompts(task, shots=3, n=4, seed=1)  # seeded
    for p in prompts:
        assert all(i in task.train for i in p.demo_indices) and p.query_index in task.test
        assert [p.text[a:b] for a, b in p.input_spans] == [task.inputs[i] for i in p.demo_indices]
        assert [p.text[a:b] for a, b in p.output_spans] == [task.outputs[i] for i in p.demo_indices]
        assert [p.text[a:b] for a, b in p.separator_spans] == [separator] * 3
        assert p.text[slice(*p.query_span)] == task.inputs[p.query_index] and p.answer == task.outputs[p.query_index]
        assert p.final_span == (len(p.text) - 1, len(p.text))
        # Every character belongs to exactly one part, and the template pieces are the template's own text.
        covered = sorted(span for spans in p.spans().values() for span in spans if span != p.final_span)
        assert [b for _, b in covered[:-1]] == [a for a, _ in covered[1:]] and covered[0][0] == 0
        assert covered[-1][1] == len(p.text)
        fixed = template.replace("{input}", "\0").replace("{output}", "\0").split("\0")
        assert "".join(p.text[a:b] for a, b in p.template_spans) == "".join(fixed) * 3 + "".join(fixed[:2]).rstrip()
        text, (start, end) = p.answered()
        between = template[:-len("{output}")].split("{input}")[1]
        assert text.startswith(p.text) and text[start:end] == between[len(between.rstrip()):] + p.answer


def test_readings_travel_with_the_query():
    task = load_pair_task("ambiguous_past_copying")
    prompt = build_pair_prompts(task, shots=4, n=1)[0]
    assert prompt.readings == {"past_tense": prompt.answer, "copying": task.inputs[prompt.query_index]}
    assert all(task.outputs[i] == task.inputs[i] for i in prompt.demo_indices)


# --- answer tokens -----------------------------------------------------------------------------------------------

def test_answer_tokens_are_read_in_context(tiny_model_dirs):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dirs["qwen2"])  # byte-level BPE: multi-token answers
    task = load_pair_task("country_capital")
    for prompt in build_pair_prompts(task, shots=2, n=8):
        tokens = answer_tokens(tokenizer, prompt)
        assert tokenizer.decode(tokens).strip() == prompt.answer
        full = tokenizer(prompt.answered()[0])["input_ids"]
        assert full[-len(tokens):] == tokens and full[:-len(tokens)] == tokenizer(prompt.text)["input_ids"]


def _prompt(answer: str, template: str = "{input} -> {output}") -> PairPrompt:
    from extraction.pair_tasks import PairTask
    import numpy as np

    task = PairTask("t", ("positive", "negative"), ("yes", answer), np.array([0]), np.array([1]), template)
    return assemble_pair_prompt(task, 1, [0])


def test_an_answer_that_tokenizes_to_nothing_is_refused(tiny_gemma_dir):
    from tokenizers import normalizers
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_gemma_dir)
    tokenizer.backend_tokenizer.normalizer = normalizers.Replace("~", "")
    assert answer_tokens(tokenizer, _prompt("no"))  # the word tokenizer knows "no"
    with pytest.raises(AnswerTokenError, match=r"the answer '~~' \(query 1\) tokenizes to nothing"):
        answer_tokens(tokenizer, _prompt("~~"))


def test_an_answer_run_into_the_template_is_refused(real_tokenizer):
    with pytest.raises(AnswerTokenError, match="runs into the template text before it"):
        answer_tokens(real_tokenizer, _prompt(".yes", template="{input}:{output}"))  # ":." is one token
    assert answer_tokens(real_tokenizer, _prompt("yes", template="{input}: {output}"))


def test_pair_files_ship_as_package_data():
    import fnmatch
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["extraction"]
    folder = root / "extraction" / "data" / "pairs"
    files = [str(path.relative_to(root / "extraction")) for path in folder.iterdir()]
    assert {f"data/pairs/{name}.jsonl" for name in PAIR_TASKS} | {"data/pairs/README.md", "data/pairs/LICENSE"} \
        == set(files)
    assert all(any(fnmatch.fnmatch(f, pattern) for pattern in patterns) for f in files)
