"""ICL prompts ``x1 y1 x2 y2 ... xk yk x``: seeded demonstration sampling, label-word checks, encoding.

Every prompt records its query, demonstration indices, the labels shown with them and where in the text those
label words are, so that head scores can find the demonstration label tokens and results stay reproducible. A label
word's token is read from the tokenized prompts (by character offsets), never from the word tokenized alone: a
SentencePiece tokenizer in legacy mode splits a lone " positive" into a bare '▁' and '▁positive'.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from extraction.errors import LabelWordError, PromptError
from extraction.positions import PositionGroups, Segment, batch_groups, prompt_segments
from extraction.tasks import Task

SAMPLING = ("uniform", "balanced")
LABEL_MODES = ("words", "symbolic", "random")
#: Default symbols for ``label_mode="symbolic"``, one per class (the paper's @ / # control).
SYMBOLS = ("@", "#", "$", "%", "&", "*", "+", "=")


@dataclass(frozen=True)
class PromptConfig:
    """How prompts are built; stored with the extracted data so a run can be reproduced exactly."""

    shots: int = 8
    n: int = 64
    seed: int = 0
    template: str | None = None
    separator: str = "\n"
    sampling: str = "uniform"
    label_mode: str = "words"
    label_words: tuple[str, ...] | None = None
    allow_multitoken_labels: bool = False

    def __post_init__(self) -> None:
        if self.shots < 0:
            raise PromptError(f"shots must be >= 0, not {self.shots}")
        if self.n < 1:
            raise PromptError(f"n (the number of queries) must be >= 1, not {self.n}")
        if self.sampling not in SAMPLING:
            raise PromptError(f"sampling must be one of {', '.join(SAMPLING)}, not {self.sampling!r}")
        if self.label_mode not in LABEL_MODES:
            raise PromptError(f"label_mode must be one of {', '.join(LABEL_MODES)}, not {self.label_mode!r}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Prompt:
    """One ICL prompt and where it came from.

    ``label_spans`` are the characters of each demonstration's label word; ``answer_spans`` add the whitespace the
    template puts before the word, which the query leaves out: they are what a model writes after a query.
    ``segments`` say which characters belong to which position group (x_i, y_i, template, separator, query; see
    :mod:`extraction.positions`); :func:`encode` turns them into per-token groups.
    """

    text: str
    label: int
    query_index: int
    demo_indices: tuple[int, ...]
    demo_labels: tuple[int, ...]
    label_spans: tuple[tuple[int, int], ...]
    answer_spans: tuple[tuple[int, int], ...]
    segments: tuple[Segment, ...] = ()


@dataclass(frozen=True)
class PromptSet:
    """The prompts of one setting, the words that stand for each class, and the config that made them.

    ``probes`` hold one one-shot prompt per label word (the first query's text labelled with the word): they give
    each word's token in context even when no prompt shows the word (zero-shot).
    """

    prompts: list[Prompt]
    label_words: tuple[str, ...]
    template: str
    config: PromptConfig
    task: str
    probes: tuple[Prompt, ...]
    label_space: str = field(default=" ")

    @property
    def labels(self) -> np.ndarray:
        return np.array([p.label for p in self.prompts])


def label_prefix_space(template: str) -> str:
    """The text right before ``{label}`` when it is whitespace (``" "`` by default): the label's leading space."""
    head = template[: template.index("{label}")]
    return head[len(head.rstrip()):]


@dataclass(frozen=True)
class Tokens:
    """One prompt tokenized (special tokens added, no padding): its token ids and each token's character span
    (special tokens span none). An extraction tokenizes each prompt once and reuses this for the label check,
    the prompt's length and its batch."""

    ids: list[int]
    offsets: list[tuple[int, int]]


def tokenize(tokenizer, prompts: Sequence[Prompt]) -> list[Tokens]:
    """Each prompt's :class:`Tokens` (one call of the tokenizer for all of them)."""
    batch = tokenizer([p.text for p in prompts], return_offsets_mapping=True)
    return [Tokens(ids, offsets) for ids, offsets in zip(batch["input_ids"], batch["offset_mapping"])]


def label_token_ids(tokenizer, prompts: PromptSet, tokens: Sequence[Tokens] | None = None) -> list[int]:
    """The token of each label word as the prompts show it: the first token of its answer, read by offsets.

    Each word's token comes from its probe (the template filled with the word, in a prompt), so zero-shot and ICL
    prompts get the same tokens. Refused, naming the words and tokens: a token that also covers text before the
    answer or after the word, multi-token words unless ``allow_multitoken_labels`` (the first token then stands for
    the word), words whose tokens collide, and any demonstration whose token at its label is not the word's token
    (read from ``tokens``, the prompts' :func:`tokenize`, when given).
    """
    probes = tokenizer([p.text for p in prompts.probes], return_offsets_mapping=True)
    answers = [
        _answer_tokens(tokenizer, word, probe, tokens, offsets)
        for word, probe, tokens, offsets in zip(prompts.label_words, prompts.probes, probes["input_ids"],
                                                probes["offset_mapping"])
    ]
    multi = [f"{word!r} -> {len(tokens)} tokens {tokenizer.convert_ids_to_tokens(tokens)}"
             for word, tokens in zip(prompts.label_words, answers) if len(tokens) > 1]
    if multi and not prompts.config.allow_multitoken_labels:
        raise LabelWordError(
            "label words that are several tokens: " + "; ".join(multi)
            + ". Choose single-token words or allow multi-token labels (their first token is then scored)."
        )
    ids = [tokens[0] for tokens in answers]
    seen: dict[int, str] = {}
    for word, token in zip(prompts.label_words, ids):
        if token in seen:
            raise LabelWordError(
                f"label words {seen[token]!r} and {word!r} share their first token "
                f"{tokenizer.convert_ids_to_tokens([token])[0]!r}; choose words that start differently"
            )
        seen[token] = word
    _check_demonstrations(tokenizer, prompts, ids, tokenize(tokenizer, prompts.prompts) if tokens is None else tokens)
    return ids


def _answer_tokens(tokenizer, word: str, probe: Prompt, tokens: list[int], offsets: list[tuple[int, int]]) -> list[int]:
    """Ids of the tokens that write ``word``'s answer in its probe; its first token must cover nothing else."""
    start, end = probe.answer_spans[0]
    hits = covering_tokens(offsets, start, end)
    if not hits:
        raise LabelWordError(f"label word {word!r} tokenizes to nothing")
    (a, b), name = offsets[hits[0]], tokenizer.convert_ids_to_tokens([tokens[hits[0]]])[0]
    if b > end:
        raise LabelWordError(
            f"the token {name!r} of label word {word!r} runs into the text after it ({probe.text[end:b]!r}); "
            "choose another separator or label word"
        )
    if a < start:
        raise LabelWordError(
            f"the token {name!r} of label word {word!r} runs into the template text before it "
            f"({probe.text[a:start]!r}); put a space or other fixed text before {{label}} in the template"
        )
    return [tokens[i] for i in hits]


def covering_tokens(offsets: list[tuple[int, int]], start: int, end: int) -> list[int]:
    """Indexes of the tokens covering characters ``start..end`` (special and padding tokens cover none)."""
    return [i for i, (a, b) in enumerate(offsets) if b > a and b > start and a < end]


def _check_demonstrations(tokenizer, prompts: PromptSet, ids: list[int], tokenized: Sequence[Tokens]) -> None:
    """Every demonstration's answer must start with its label's token (context can change a word's tokens)."""
    for row, (prompt, tokens) in enumerate(zip(prompts.prompts, tokenized)):
        for number, ((start, end), label) in enumerate(zip(prompt.answer_spans, prompt.demo_labels), 1):
            hits = covering_tokens(tokens.offsets, start, end)
            if hits and tokens.ids[hits[0]] == ids[label]:
                continue
            found = tokenizer.convert_ids_to_tokens([tokens.ids[hits[0]]])[0] if hits else None
            expected = tokenizer.convert_ids_to_tokens([ids[label]])[0]
            raise LabelWordError(
                f"label word {prompts.label_words[label]!r} is token {expected!r} but demonstration {number} of "
                f"prompt {row} (query {prompt.query_index}) has {found!r} there, in "
                f"{prompt.text[max(0, start - 20):end + 5]!r}; the text around it changes its tokens: put fixed "
                "template text before {label} and a separator after it"
            )


def sample_demos(task: Task, rng: np.random.Generator, shots: int, sampling: str) -> np.ndarray:
    """``shots`` demonstration indices from the task's pool (``uniform`` or class-``balanced``), drawn with ``rng``."""
    if sampling == "uniform":
        return rng.choice(task.train, size=shots, replace=False)
    per_class = np.full(task.n_classes, shots // task.n_classes)
    per_class[rng.choice(task.n_classes, size=shots % task.n_classes, replace=False)] += 1
    chosen = []
    for label, count in enumerate(per_class):
        pool = task.train[task.labels[task.train] == label]
        if count > len(pool):
            raise PromptError(f"balanced sampling needs {count} demonstrations of class {task.classes[label]!r}; "
                              f"the pool has {len(pool)}")
        chosen.append(rng.choice(pool, size=count, replace=False))
    return rng.permutation(np.concatenate(chosen))


def _label_words(task: Task, config: PromptConfig) -> tuple[str, ...]:
    if config.label_words:
        words = tuple(config.label_words)
    elif config.label_mode == "symbolic":
        if task.n_classes > len(SYMBOLS):
            raise PromptError(f"symbolic labels support up to {len(SYMBOLS)} classes; give label_words instead")
        words = SYMBOLS[: task.n_classes]
    else:
        words = task.label_words
    if len(words) != task.n_classes:
        raise PromptError(f"{len(words)} label words given for the {task.n_classes} classes of {task.name!r}")
    return words


def build_prompts(task: Task, config: PromptConfig | None = None, **overrides) -> PromptSet:
    """Seeded prompts: ``n`` queries from the query pool, each with ``shots`` demonstrations from the other pool."""
    config = config or PromptConfig(**overrides)
    if overrides and config is not None:
        config = PromptConfig(**{**config.to_dict(), **overrides})
    template = config.template or task.template
    if config.shots > len(task.train):
        raise PromptError(f"shots={config.shots} but the demonstration pool of {task.name!r} has only "
                          f"{len(task.train)} examples")
    if config.n > len(task.test):
        raise PromptError(f"n={config.n} but the query pool of {task.name!r} has only {len(task.test)} examples")
    words = _label_words(task, config)
    rng = np.random.default_rng(config.seed)
    queries = rng.permutation(task.test)[: config.n]
    prompts = []
    for query in queries:
        demos = sample_demos(task, rng, config.shots, config.sampling) if config.shots else np.array([], int)
        shown = task.labels[demos]
        if config.label_mode == "random":
            shown = rng.integers(task.n_classes, size=len(demos))
        prompts.append(assemble_prompt(template, config.separator, task, int(query), demos, shown, words))
    probes = tuple(assemble_prompt(template, config.separator, task, int(queries[0]), queries[:1], [label], words)
                   for label in range(len(words)))
    return PromptSet(prompts, words, template, config, task.name, probes, label_prefix_space(template))


def assemble_prompt(template: str, separator: str, task: Task, query: int, demos, shown, words: tuple[str, ...]
                    ) -> Prompt:
    """The prompt ``demo_1 sep ... demo_k sep query`` (the query's template stops before its label's whitespace)."""
    head = template[: template.index("{label}")]
    space = len(label_prefix_space(template))
    parts, spans, answers, offset = [], [], [], 0
    for demo, label in zip(demos, shown):
        start = offset + len(head.format(text=task.texts[demo]))
        spans.append((start, start + len(words[label])))
        answers.append((start - space, start + len(words[label])))
        parts.append(template.format(text=task.texts[demo], label=words[label]))
        offset += len(parts[-1]) + len(separator)
    parts.append(head.rstrip().format(text=task.texts[query]))
    text, segments = prompt_segments(template, separator, [(task.texts[d], words[l]) for d, l in zip(demos, shown)],
                                     task.texts[query])
    if text != separator.join(parts):
        raise PromptError(f"the template {template!r} cannot be split into position groups; end its query part "
                          "({text} and the words before {label}) with fixed text")
    return Prompt(
        text=text,
        label=int(task.labels[query]),
        query_index=query,
        demo_indices=tuple(int(d) for d in demos),
        demo_labels=tuple(int(s) for s in shown),
        label_spans=tuple(spans),
        answer_spans=tuple(answers),
        segments=segments,
    )


@dataclass
class Encoded:
    """Left-padded token ids of a batch of prompts, the position of each demonstration's label token per row, and
    every token's position group (None for prompts built without segments)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    label_positions: list[list[int]]
    groups: PositionGroups | None = None


def check_lengths(lengths: np.ndarray, prompts: Sequence[Prompt], max_length: int | None) -> None:
    """Refuse the longest of ``prompts`` (token ``lengths``, in the same order) if it exceeds ``max_length``."""
    if max_length is None or not len(lengths) or int(lengths.max()) <= max_length:
        return
    worst = int(lengths.argmax())
    raise PromptError(
        f"a prompt is {int(lengths[worst])} tokens, longer than the model's context of {max_length} "
        f"(query index {prompts[worst].query_index}); use fewer shots or shorter texts"
    )


def encode(tokenizer, prompts: list[Prompt], max_length: int | None = None,
           tokens: Sequence[Tokens] | None = None) -> Encoded:
    """Tokenize with left padding; ``max_length`` (the model's context) turns an overlong prompt into an error.

    ``tokens`` (the prompts' :func:`tokenize`) are padded instead of tokenizing again. Prompts with segments also
    get their tokens' position groups (a group with no token is a PromptError).
    """
    if tokenizer.padding_side != "left":
        raise PromptError("the tokenizer must pad on the left so the query is the last position")
    input_ids, mask, offset_mapping = _pad_left(tokenize(tokenizer, prompts) if tokens is None else tokens,
                                                tokenizer.pad_token_id)
    check_lengths(mask.sum(dim=1).numpy(), prompts, max_length)
    positions = []
    for row, prompt in enumerate(prompts):
        offsets = offset_mapping[row].tolist()
        found = []
        for start, end in prompt.answer_spans:
            hits = covering_tokens(offsets, start, end)
            if not hits:
                raise PromptError(f"cannot locate a demonstration label at characters {start}..{end} in the tokens")
            found.append(hits[0])
        positions.append(found)
    groups = None
    if all(p.segments for p in prompts):
        groups = batch_groups(offset_mapping, mask, [p.segments for p in prompts])
    return Encoded(input_ids, mask, positions, groups)


def _pad_left(tokens: Sequence[Tokens], pad_id: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids, attention mask and (B, T, 2) character spans of a batch, left-padded to its longest prompt as
    the tokenizer pads (``pad_id``, mask 0, span (0, 0))."""
    if pad_id is None:
        raise PromptError("the tokenizer has no padding token; set tokenizer.pad_token (load_model sets it to EOS)")
    width = max((len(t.ids) for t in tokens), default=0)
    input_ids = torch.full((len(tokens), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(tokens), width), dtype=torch.long)
    offsets = torch.zeros((len(tokens), width, 2), dtype=torch.long)
    for row, t in enumerate(tokens):
        start = width - len(t.ids)
        input_ids[row, start:] = torch.tensor(t.ids, dtype=torch.long)
        mask[row, start:] = 1
        offsets[row, start:] = torch.tensor(t.offsets, dtype=torch.long).reshape(-1, 2)
    return input_ids, mask, offsets
