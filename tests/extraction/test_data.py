"""The built-in task files: size, balance, split, text form and no (near-)duplicates (rules in extraction/data/README.md)."""

from __future__ import annotations

import json
import re
from collections import Counter
from importlib import resources
from itertools import combinations

import pytest

from extraction.tasks import BUILTIN, load_task

MIN_EXAMPLES = 1000
MIN_QUERIES = 500
#: Two texts whose word sets have at least this Jaccard similarity are near-duplicates.
NEAR_DUPLICATE = 0.6
#: Word sets smaller than this are compared for exact equality only.
MIN_DISTINCT_WORDS = 4
#: Tasks whose texts are names: only exact duplicates count (people may share a first name or surname).
EXACT_ONLY = {"profession"}


def _records(task: str) -> list[dict]:
    text = resources.files("extraction").joinpath("data", f"{task}.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.split("\n") if line]


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def duplicates(texts: list[str], exact_only: bool = False) -> list[tuple[str, str]]:
    """Pairs of texts that are duplicates (equal word lists) or near-duplicates (word-set Jaccard >= 0.6)."""
    words = [_words(t) for t in texts]
    sets = [set(w) for w in words]
    found = []
    for i, j in combinations(range(len(texts)), 2):
        if words[i] == words[j]:
            found.append((texts[i], texts[j]))
        elif not exact_only and min(len(sets[i]), len(sets[j])) >= MIN_DISTINCT_WORDS:
            if len(sets[i] & sets[j]) >= NEAR_DUPLICATE * len(sets[i] | sets[j]):
                found.append((texts[i], texts[j]))
    return found


@pytest.fixture(scope="module", params=sorted(BUILTIN))
def task_records(request) -> tuple[str, list[dict]]:
    return request.param, _records(request.param)


def test_duplicate_rule():
    assert duplicates(["The soup was cold.", "the soup -- was COLD"]) != []
    assert duplicates(["a b c d e", "a b c d f"]) != []  # 4 shared of 6 words: 0.67
    assert duplicates(["a b c d e", "a b c f g"]) == []  # 3 of 7: 0.43
    assert duplicates(["a b c", "a b d"]) == []  # too short to be near
    assert duplicates(["Ada Lovelace", "Ada Lovelace"], exact_only=True) != []
    assert duplicates(["Marie Curie Sklodowska Polish", "Marie Curie Sklodowska French"], exact_only=True) == []


def test_records_have_text_label_split(task_records):
    task, rows = task_records
    classes = BUILTIN[task][0]
    assert all(set(r) == {"text", "label", "split"} for r in rows)
    assert {r["label"] for r in rows} <= set(classes)
    assert {r["split"] for r in rows} <= {"train", "test"}


def test_size_and_balance(task_records):
    task, rows = task_records
    classes = BUILTIN[task][0]
    counts = Counter(r["label"] for r in rows)
    assert len(rows) >= MIN_EXAMPLES, f"{task}: {len(rows)} examples"
    assert set(counts) == set(classes) and len(set(counts.values())) == 1, f"{task}: {dict(counts)}"


def test_half_of_each_class_in_each_split(task_records):
    task, rows = task_records
    counts = Counter((r["label"], r["split"]) for r in rows)
    for label in BUILTIN[task][0]:
        assert counts[label, "train"] == counts[label, "test"], f"{task}/{label}: {counts[label, 'train']} train, " \
                                                                f"{counts[label, 'test']} test"
    assert sum(r["split"] == "test" for r in rows) >= MIN_QUERIES


def test_loaded_query_pool(task_records):
    task, _ = task_records
    loaded = load_task(task)
    n_train, n_test = len(loaded.train), len(loaded.test)
    assert n_test >= MIN_QUERIES and n_train == n_test, f"{task}: {n_train} train, {n_test} test"


def test_texts_are_clean_ascii_lines(task_records):
    task, rows = task_records
    bad = [r["text"] for r in rows
           if not r["text"] or not r["text"].isascii() or not r["text"].isprintable() or r["text"] != r["text"].strip()]
    assert bad == [], f"{task}: {bad[:5]}"


def test_no_duplicates_or_near_duplicates(task_records):
    task, rows = task_records
    found = duplicates([r["text"] for r in rows], exact_only=task in EXACT_ONLY)
    assert found == [], f"{task}: {len(found)} (near-)duplicate pairs, e.g. {found[:5]}"
