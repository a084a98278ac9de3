"""Labelled classification tasks: the built-in datasets shipped in ``extraction/data`` and the user's own files.

A :class:`Task` holds texts, integer labels, class names, label words, a default template and a fixed split into a
demonstration pool (``train``) and a query pool (``test``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from extraction.errors import TaskError

#: Built-in tasks: (classes in label order, default template). The label words are the class names.
BUILTIN = {
    "sentiment": (("negative", "positive"), "{text} Sentiment: {label}"),
    "subjectivity": (("objective", "subjective"), "{text} Type: {label}"),
    "question_type": (
        ("abbreviation", "entity", "description", "human", "location", "number"),
        "Question: {text} Type: {label}",
    ),
    "topic": (("world", "sports", "business", "science"), "Article: {text} Topic: {label}"),
    "profession": (("actor", "singer", "scientist", "athlete", "politician", "writer"), "{text} is a: {label}"),
}
DEFAULT_TEMPLATE = "{text} Answer: {label}"
#: Share of each class that goes to the demonstration pool when a user file has no ``split`` column. The built-in
#: files carry their own split, half of each class per pool (at least 500 queries; see extraction/data/README.md).
FILE_SPLIT_FRACTION = 0.6


@dataclass(frozen=True)
class Task:
    """A labelled task with a fixed demonstration pool (``train``) and query pool (``test``)."""

    name: str
    texts: tuple[str, ...]
    labels: np.ndarray
    classes: tuple[str, ...]
    template: str
    train: np.ndarray
    test: np.ndarray
    label_words: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if not self.label_words:
            object.__setattr__(self, "label_words", self.classes)
        if len(self.label_words) != len(self.classes):
            raise TaskError(f"task {self.name!r}: {len(self.label_words)} label words for {len(self.classes)} classes")
        if "{text}" not in self.template or "{label}" not in self.template:
            raise TaskError(f"template {self.template!r} must contain '{{text}}' and '{{label}}'")
        if not self.template.rstrip().endswith("{label}"):
            raise TaskError(f"template {self.template!r} must end with '{{label}}' (the answer comes last)")
        for pool_name, pool in (("demonstration (train)", self.train), ("query (test)", self.test)):
            present = set(self.labels[pool].tolist())
            empty = [c for i, c in enumerate(self.classes) if i not in present]
            if empty:
                raise TaskError(f"task {self.name!r}: class(es) {', '.join(empty)} have no examples in the {pool_name} pool")

    @property
    def n_classes(self) -> int:
        return len(self.classes)


def list_tasks() -> list[str]:
    """Names of the built-in tasks."""
    return sorted(BUILTIN)


def read_records(path: Path) -> list[dict]:
    import pandas as pd

    readers = {".csv": pd.read_csv, ".jsonl": lambda p: pd.read_json(p, lines=True), ".parquet": pd.read_parquet}
    if path.suffix not in readers:
        raise TaskError(f"cannot read {path}: use a .csv, .jsonl or .parquet file")
    if not path.is_file():
        raise TaskError(f"{path} is not a file; give a .csv, .jsonl or .parquet file" if path.exists()
                        else f"data file not found: {path}")
    try:
        return readers[path.suffix](path).to_dict("records")
    except UnicodeDecodeError as error:
        raise TaskError(f"{path} is not UTF-8 text ({error.reason} at byte {error.start}); save it as UTF-8") from error
    except (ValueError, OSError) as error:
        raise TaskError(f"cannot read {path} as {path.suffix[1:].upper()}: {error}; check the file's format "
                        "(one record per row or line, with text and label fields)") from error


def record_split(name: str, records: list[dict], strata: np.ndarray) -> np.ndarray:
    """Each record's pool, ``train`` or ``test``: its ``split`` value, or a seeded split stratified by ``strata``."""
    if "split" not in records[0]:
        return _fixed_split(strata)
    split = np.array([str(r["split"]) for r in records], dtype=object)
    bad = sorted(set(split) - {"train", "test"})
    if bad:
        raise TaskError(f"task {name!r}: split values must be 'train' or 'test', found {', '.join(bad)}")
    return split


def _fixed_split(labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """A stratified, seeded 60/40 train/test split, used when a file has no ``split`` column."""
    rng = np.random.default_rng(seed)
    split = np.empty(len(labels), dtype=object)
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        cut = int(round(FILE_SPLIT_FRACTION * len(members)))
        split[members[:cut]], split[members[cut:]] = "train", "test"
    return split


def task_from_records(
    name: str,
    records: list[dict],
    *,
    template: str,
    classes: tuple[str, ...] | None = None,
    label_words: tuple[str, ...] | None = None,
) -> Task:
    """Build a task from records with ``text`` and ``label`` keys and an optional ``split`` (train/test)."""
    if not records:
        raise TaskError(f"task {name!r} has no examples")
    missing = sorted({"text", "label"} - set(records[0]))
    if missing:
        raise TaskError(f"task {name!r}: missing column(s) {', '.join(missing)}; found {', '.join(records[0])}")
    raw_labels = [str(r["label"]) for r in records]
    classes = tuple(classes) if classes else tuple(sorted(set(raw_labels)))
    unknown = sorted(set(raw_labels) - set(classes))
    if unknown:
        raise TaskError(f"task {name!r}: labels {', '.join(unknown)} are not among the classes {', '.join(classes)}")
    if len(classes) < 2:
        raise TaskError(f"task {name!r} needs at least two classes, it has {len(classes)}")
    labels = np.array([classes.index(label) for label in raw_labels])
    split = record_split(name, records, labels)
    return Task(
        name=name,
        texts=tuple(str(r["text"]) for r in records),
        labels=labels,
        classes=classes,
        template=template,
        train=np.flatnonzero(split == "train"),
        test=np.flatnonzero(split == "test"),
        label_words=tuple(label_words) if label_words else (),
    )


def load_task(
    name: str,
    *,
    template: str | None = None,
    label_words: tuple[str, ...] | None = None,
) -> Task:
    """A built-in task by name, or a user file (``.csv``/``.jsonl``/``.parquet``) by path."""
    if name in BUILTIN:
        classes, default_template = BUILTIN[name]
        text = resources.files("extraction").joinpath("data", f"{name}.jsonl").read_text(encoding="utf-8")
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
        return task_from_records(name, records, template=template or default_template, classes=classes,
                                 label_words=label_words)
    path = Path(name)
    if path.suffix in {".csv", ".jsonl", ".parquet"}:
        return task_from_records(path.stem, read_records(path), template=template or DEFAULT_TEMPLATE,
                                 label_words=label_words)
    raise TaskError(f"unknown task {name!r}: choose one of {', '.join(list_tasks())} or give a .csv/.jsonl/.parquet file")


def load_hf_task(
    dataset: str,
    *,
    config: str | None = None,
    text_column: str = "text",
    label_column: str = "label",
    template: str = DEFAULT_TEMPLATE,
    label_words: tuple[str, ...] | None = None,
) -> Task:
    """A task from a Hugging Face ``datasets`` dataset (local cache or hub), its train/test splits as the pools."""
    try:
        import datasets
    except ImportError as error:
        raise TaskError("Hugging Face datasets are optional: pip install 'icl-geometry[datasets]'") from error
    try:
        loaded = datasets.load_dataset(dataset, config)
    except Exception as error:  # the library raises many types for "not reachable / not cached"
        raise TaskError(
            f"cannot load dataset {dataset!r}: {error}. It must be in the local Hugging Face cache when offline."
        ) from error
    records = []
    for split in ("train", "test"):
        if split not in loaded:
            raise TaskError(f"dataset {dataset!r} has no {split!r} split; it has {', '.join(loaded)}")
        part = loaded[split]
        names = part.features[label_column].names if hasattr(part.features[label_column], "names") else None
        for row in part:
            label = names[row[label_column]] if names else row[label_column]
            records.append({"text": row[text_column], "label": label, "split": split})
    return task_from_records(dataset, records, template=template, label_words=label_words)
