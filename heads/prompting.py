"""Reference prompt sets as encoded, length-sorted batches: what scores, head means, task vectors and sweeps run over.

Prompts come from :func:`extraction.prompts.build_prompts`, so a reference set with the same task, shots, ``n`` and
seed holds the same queries (and, for the same shots, the same demonstrations) as the store group extracted with
those settings; the zero-shot and k-shot sets of one seed share their queries.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from extraction.extractor import batches_by_length
from extraction.models import LoadedModel
from extraction.prompts import (Encoded, Prompt, PromptConfig, PromptSet, build_prompts, encode, label_token_ids,
                                tokenize)
from extraction.tasks import Task, load_task
from heads.errors import HeadsError

#: PromptConfig fields other than shots, n and seed that callers may pass through (as ``extraction.extract`` does).
PROMPT_OPTIONS = tuple(f.name for f in fields(PromptConfig) if f.name not in ("shots", "n", "seed"))


@dataclass
class PromptBatches:
    """A prompt set, its label words' token ids, its batches as (example indices, left-padded encoding) and the task
    that built it."""

    prompts: PromptSet
    label_tokens: list[int]
    batches: list[tuple[np.ndarray, Encoded]]
    task: Task | None = None

    def rows(self, index: np.ndarray) -> tuple[Prompt, ...]:
        """The prompts of examples ``index`` (a batch's rows)."""
        return tuple(self.prompts.prompts[i] for i in index)

    def config(self) -> dict[str, Any]:
        """JSON-ready description of the prompts (recorded with scores and interventions)."""
        return {"task": self.prompts.task, **self.prompts.config.to_dict(), "template": self.prompts.template}


def prompt_batches(
    loaded: LoadedModel,
    *,
    task: str | Task = "sentiment",
    shots: int = 8,
    n: int = 50,
    seed: int = 0,
    batch_size: int = 8,
    **options: Any,
) -> PromptBatches:
    """Build ``n`` seeded prompts of ``task`` and encode them in batches of similar length.

    ``options`` are the other prompt settings of ``extraction.extract`` (template, separator, sampling,
    label_mode, label_words, allow_multitoken_labels).
    """
    unknown = sorted(set(options) - set(PROMPT_OPTIONS))
    if unknown:
        raise HeadsError(f"unknown prompt option(s) {', '.join(unknown)}; valid: {', '.join(PROMPT_OPTIONS)}")
    if batch_size < 1:
        raise HeadsError(f"batch_size must be >= 1, not {batch_size}")
    task_obj = task if isinstance(task, Task) else load_task(task, template=options.get("template"))
    prompts = build_prompts(task_obj, PromptConfig(shots=shots, n=n, seed=seed, **options))
    tokenized = tokenize(loaded.tokenizer, prompts.prompts)
    tokens = label_token_ids(loaded.tokenizer, prompts, tokenized)
    batches = [
        (index, encode(loaded.tokenizer, [prompts.prompts[i] for i in index], max_length=loaded.arch.max_context,
                       tokens=[tokenized[i] for i in index]))
        for index in batches_by_length(tokenized, batch_size)
    ]
    return PromptBatches(prompts, tokens, batches, task_obj)
