"""String-to-string ICL tasks (``walk -> walked``): the built-in pair files, users' files, prompts and answer tokens.

A :class:`PairTask` maps input strings to output strings (usually several tokens long) with a fixed split into a
demonstration pool (``train``) and a query pool (``test``). An ambiguous task also carries ``readings``: the output
of every example under each of two tasks; both readings agree on every demonstration and differ on every query, so
what the model writes after a query tells which task it inferred.

A :class:`PairPrompt` records the characters of every part it is made of (each demonstration's input x_i and output
y_i, the separators, the template's own text, the query input and the final position), so that position groups and
attention-edge interventions can be derived from the tokenized prompt by offsets. The answer's first token is read
from the prompt followed by the answer (by offsets, as :mod:`extraction.prompts` reads label tokens), never from the
answer tokenized alone.
"""

from __future__ import annotations

import json
from bisect import bisect_right
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from extraction.errors import AnswerTokenError, PromptError, TaskError
from extraction.positions import Segment
from extraction.prompts import covering_tokens
from extraction.tasks import read_records, record_split

DEFAULT_PAIR_TEMPLATE = "{input} -> {output}"
#: Built-in pair tasks: file stem in ``extraction/data/pairs`` -> one line saying what it is.
PAIR_TASKS = {
    "capitalization": "a lowercase word -> the word with a capital first letter (apple -> Apple)",
    "copying": "a word -> the same word (table -> table)",
    "past_tense": "a verb -> its simple past, regular and irregular (walk -> walked, go -> went)",
    "country_capital": "a country or territory -> its capital (France -> Paris)",
    "person_sport": "a well-known athlete -> their sport (Serena Williams -> tennis)",
    "ambiguous_past_copying": "demonstrations of verbs whose past is the present (cut -> cut); queries that "
                              "separate past tense from copying (walk -> walked or walk)",
    "ambiguous_capitalization_copying": "demonstrations of capitalized words (Paris -> Paris); queries that "
                                        "separate capitalization from copying (apple -> Apple or apple)",
}
Span = tuple[int, int]


@dataclass(frozen=True)
class PairTask:
    """Input -> output pairs with a fixed demonstration pool (``train``) and query pool (``test``).

    ``readings`` (ambiguous tasks only) give each example's output under each task that may explain it; ``outputs``
    are the first reading's.
    """

    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    train: np.ndarray
    test: np.ndarray
    template: str = DEFAULT_PAIR_TEMPLATE
    separator: str = "\n"
    readings: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_template(self.template)
        if len(self.inputs) != len(self.outputs):
            raise TaskError(f"task {self.name!r}: {len(self.inputs)} inputs but {len(self.outputs)} outputs")
        for what, values in (("input", self.inputs), ("output", self.outputs)):
            empty = [i for i, value in enumerate(values) if not value.strip()]
            if empty:
                raise TaskError(f"task {self.name!r}: {len(empty)} empty {what}(s), the first in row {empty[0]}; "
                                f"give every row a non-blank {what}")
        for pool_name, pool in (("demonstration (train)", self.train), ("query (test)", self.test)):
            if len(pool) == 0:
                raise TaskError(f"task {self.name!r} has no examples in the {pool_name} pool")
        for reading, outputs in self.readings.items():
            if len(outputs) != len(self.inputs):
                raise TaskError(f"task {self.name!r}: reading {reading!r} has {len(outputs)} outputs for "
                                f"{len(self.inputs)} inputs")


def check_template(template: str) -> None:
    """Refuse a template without ``{input}`` then ``{output}`` at its end (the answer must come last)."""
    if "{input}" not in template or "{output}" not in template:
        raise TaskError(f"template {template!r} must contain '{{input}}' and '{{output}}'")
    if not template.endswith("{output}") or template.index("{input}") > template.index("{output}"):
        raise TaskError(f"template {template!r} must put '{{input}}' first and end with '{{output}}' "
                        "(the answer comes last)")


def list_pair_tasks() -> list[str]:
    """Names of the built-in pair tasks."""
    return sorted(PAIR_TASKS)


def pair_task_from_records(name: str, records: Sequence[Mapping], *, template: str = DEFAULT_PAIR_TEMPLATE,
                           separator: str = "\n") -> PairTask:
    """A task from records with ``input`` and ``output`` keys, an optional ``split`` (train/test; without it a
    seeded 60/40 split) and optional ``readings`` (a dict of reading name -> output per record)."""
    if not len(records):
        raise TaskError(f"task {name!r} has no examples")
    missing = sorted({"input", "output"} - set(records[0]))
    if missing:
        found = ", ".join(map(str, records[0]))
        raise TaskError(f"task {name!r}: missing column(s) {', '.join(missing)} (found {found}); a pair task needs "
                        "an 'input' and an 'output' column")
    inputs = tuple(_text(r["input"]) for r in records)
    outputs = tuple(_text(r["output"]) for r in records)
    split = record_split(name, records, np.zeros(len(records), dtype=int))
    readings: dict[str, tuple[str, ...]] = {}
    if "readings" in records[0]:
        names = tuple(records[0]["readings"])
        if any(not isinstance(r["readings"], Mapping) or tuple(r["readings"]) != names for r in records):
            raise TaskError(f"task {name!r}: every row's 'readings' must be a dict with the keys {', '.join(names)}")
        readings = {reading: tuple(_text(r["readings"][reading]) for r in records) for reading in names}
    return PairTask(name, inputs, outputs, np.flatnonzero(split == "train"), np.flatnonzero(split == "test"),
                    template, separator, readings)


def _text(value) -> str:
    """A cell as text; missing cells (NaN from pandas) become empty strings, which the task then refuses."""
    return "" if value is None or isinstance(value, float) and np.isnan(value) else str(value)


def load_pair_task(name: str, *, template: str | None = None, separator: str = "\n") -> PairTask:
    """A built-in pair task by name (see :data:`PAIR_TASKS`), or a user file (``.csv``/``.jsonl``/``.parquet``
    with ``input`` and ``output`` columns) by path."""
    template = template or DEFAULT_PAIR_TEMPLATE
    if name in PAIR_TASKS:
        text = resources.files("extraction").joinpath("data", "pairs", f"{name}.jsonl").read_text(encoding="utf-8")
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
        return pair_task_from_records(name, records, template=template, separator=separator)
    path = Path(name)
    if path.suffix in {".csv", ".jsonl", ".parquet"}:
        return pair_task_from_records(path.stem, read_records(path), template=template, separator=separator)
    raise TaskError(f"unknown pair task {name!r}: choose one of {', '.join(list_pair_tasks())} or give a "
                    ".csv/.jsonl/.parquet file with input and output columns")


def is_pair_task(task: Any) -> bool:
    """Whether ``task`` is a pair task: a :class:`PairTask`, a built-in pair task's name, or a .csv/.jsonl/.parquet
    file whose first record has an ``input`` column (classification files have ``text`` and ``label``)."""
    if isinstance(task, PairTask):
        return True
    if not isinstance(task, (str, Path)):
        return False
    path = Path(task)
    if str(task) in PAIR_TASKS:
        return True
    if path.suffix not in {".csv", ".jsonl", ".parquet"} or not path.is_file():
        return False
    records = read_records(path)
    return bool(records) and "input" in records[0]


@dataclass(frozen=True)
class PairPrompt:
    """One prompt ``x_1 -> y_1 sep ... x_k -> y_k sep x ->`` and the characters of each of its parts.

    Spans are (start, end) character ranges of ``text``: ``input_spans``/``output_spans`` the demonstrations' x_i
    and y_i (the words only), ``separator_spans`` the separator after each demonstration, ``template_spans`` every
    piece of the template's own text (demonstrations and query, in order), ``query_span`` the query's input and
    ``final_span`` the last character (its token is the final position). ``answer_space`` is the whitespace the
    template puts before the output, which the query leaves for the model to write.
    """

    text: str
    query_index: int
    demo_indices: tuple[int, ...]
    answer: str
    input_spans: tuple[Span, ...]
    output_spans: tuple[Span, ...]
    separator_spans: tuple[Span, ...]
    template_spans: tuple[Span, ...]
    query_span: Span
    answer_space: str
    readings: Mapping[str, str] = field(default_factory=dict)

    @property
    def final_span(self) -> Span:
        return len(self.text) - 1, len(self.text)

    def answered(self, answer: str | None = None) -> tuple[str, Span]:
        """The prompt followed by ``answer`` (default: the gold one) and the answer's span, its whitespace included."""
        answer = self.answer if answer is None else answer
        return self.text + self.answer_space + answer, (len(self.text), len(self.text) + len(self.answer_space)
                                                        + len(answer))

    def spans(self) -> dict[str, list[Span]]:
        """Every part's character spans by group name: x, y, separator, template, query, final."""
        return {"x": list(self.input_spans), "y": list(self.output_spans), "separator": list(self.separator_spans),
                "template": list(self.template_spans), "query": [self.query_span], "final": [self.final_span]}

    @property
    def answer_spans(self) -> tuple[Span, ...]:
        """The demonstrations' outputs y_i (as :func:`extraction.prompts.encode` reads a prompt's shown answers)."""
        return self.output_spans

    @property
    def segments(self) -> tuple[Segment, ...]:
        """The parts as :mod:`extraction.positions` segments, in text order, so that :func:`extraction.prompts.encode`
        gives pair prompts their tokens' position groups (x_i input, y_i output, separators, template, query; the
        last token is the final position). A template piece belongs to the demonstration it is part of, the query's
        to none."""
        ends = [end for _, end in self.output_spans]

        def demo(start: int) -> int:
            index = bisect_right(ends, start)
            return index if index < len(ends) else -1

        parts = [Segment("input", i, *span) for i, span in enumerate(self.input_spans)]
        parts += [Segment("output", i, *span) for i, span in enumerate(self.output_spans)]
        parts += [Segment("separator", i, *span) for i, span in enumerate(self.separator_spans)]
        parts += [Segment("template", demo(span[0]), *span) for span in self.template_spans]
        parts.append(Segment("query", -1, *self.query_span))
        return tuple(sorted(parts, key=lambda part: part.start))


@dataclass(frozen=True)
class PairPromptConfig:
    """How pair prompts are built (stored with results so a run can be reproduced)."""

    shots: int = 8
    n: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        if self.shots < 0:
            raise PromptError(f"shots must be >= 0, not {self.shots}")
        if self.n < 1:
            raise PromptError(f"n (the number of queries) must be >= 1, not {self.n}")

    def to_dict(self) -> dict:
        return asdict(self)


def build_pair_prompts(task: PairTask, config: PairPromptConfig | None = None, **overrides) -> list[PairPrompt]:
    """Seeded prompts: ``n`` queries from the query pool, each with ``shots`` demonstrations from the other pool."""
    config = PairPromptConfig(**{**(config or PairPromptConfig()).to_dict(), **overrides})
    if config.shots > len(task.train):
        raise PromptError(f"shots={config.shots} but the demonstration pool of {task.name!r} has only "
                          f"{len(task.train)} examples")
    if config.n > len(task.test):
        raise PromptError(f"n={config.n} but the query pool of {task.name!r} has only {len(task.test)} examples")
    rng = np.random.default_rng(config.seed)
    queries = rng.permutation(task.test)[: config.n]
    prompts = []
    for query in queries:
        demos = rng.choice(task.train, size=config.shots, replace=False) if config.shots else np.array([], int)
        prompts.append(assemble_pair_prompt(task, int(query), [int(d) for d in demos]))
    return prompts


def assemble_pair_prompt(task: PairTask, query: int, demos: Sequence[int]) -> PairPrompt:
    """The prompt ``demo_1 sep ... demo_k sep query``; the query's template stops before the output's whitespace."""
    before, rest = task.template.split("{input}", 1)
    between = rest[: -len("{output}")]
    query_tail = between.rstrip()
    text, inputs, outputs, separators, template = "", [], [], [], []

    def add(piece: str, spans: list | None) -> None:
        nonlocal text
        if piece and spans is not None:
            spans.append((len(text), len(text) + len(piece)))
        text += piece

    for demo in demos:
        add(before, template)
        add(task.inputs[demo], inputs)
        add(between, template)
        add(task.outputs[demo], outputs)
        add(task.separator, separators)
    add(before, template)
    start = len(text)
    add(task.inputs[query], None)
    add(query_tail, template)
    return PairPrompt(
        text=text, query_index=query, demo_indices=tuple(demos), answer=task.outputs[query],
        input_spans=tuple(inputs), output_spans=tuple(outputs), separator_spans=tuple(separators),
        template_spans=tuple(template), query_span=(start, start + len(task.inputs[query])),
        answer_space=between[len(query_tail):],
        readings={name: values[query] for name, values in task.readings.items()},
    )


def answer_tokens(tokenizer, prompt: PairPrompt, answer: str | None = None) -> list[int]:
    """The tokens that write ``answer`` (default: the gold one) right after ``prompt``, read by offsets.

    Refused with an :class:`AnswerTokenError`: an answer that tokenizes to nothing, and one whose first token also
    covers template text before it or whose arrival changes the prompt's own tokens (then the model's next-token
    prediction at the final position cannot be compared with the answer's first token).
    """
    answer = prompt.answer if answer is None else answer
    text, (start, end) = prompt.answered(answer)
    encoded = tokenizer([prompt.text, text], return_offsets_mapping=True)
    (alone, tokens), offsets = encoded["input_ids"], encoded["offset_mapping"][1]
    hits = covering_tokens(offsets, start, end)
    if not hits:
        raise AnswerTokenError(f"the answer {answer!r} (query {prompt.query_index}) tokenizes to nothing; "
                               "remove it or give it visible characters")
    first, name = hits[0], tokenizer.convert_ids_to_tokens([tokens[hits[0]]])[0]
    if offsets[first][0] < start:
        raise AnswerTokenError(
            f"the answer {answer!r}'s first token {name!r} runs into the template text before it "
            f"({text[max(0, start - 10):start]!r}); put a space or other fixed text before {{output}} in the template"
        )
    if tokens[:first] != alone:
        raise AnswerTokenError(
            f"the prompt's own tokens change when the answer {answer!r} follows it (query {prompt.query_index}); "
            "end the template's text before {output} with a space or other fixed text"
        )
    return [tokens[i] for i in hits]
