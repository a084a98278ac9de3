"""Donor prompts for counterfactual edge patching, rebuilt deterministically from each base prompt and a short spec.

A patched run reads some keys and values from a *donor* run (see :class:`extraction.edges.EdgePatch`); its donor
prompts are not stored but described by a spec, so a store group's record rebuilds them exactly from its own prompts:

=====================  ==================================================================================
spec                   donor of a base prompt
=====================  ==================================================================================
``shuffled[:SEED]``    the same demonstrations and query, the labels shown with them permuted (see below)
``demos:SEED``         other demonstrations drawn from the task's pool (its sampling and label mode), same query
``task:NAME[:SEED]``   demonstrations of another task (its template and label words) and one of its queries
=====================  ==================================================================================

The seed (default 0) and the base prompt's query index seed each donor's draw, so a prompt's donor does not depend
on the other prompts of the run or on how they are batched. A plain random permutation of a few labels often leaves
them where they were (3 shots labelled 1, 0, 0: one draw in three), and such a donor patches nothing; ``shuffled``
takes, of :data:`SHUFFLE_DRAWS` seeded permutations, the first that moves the most labels to a demonstration that
showed another label.

>>> DonorSpec.parse("task:topic").text, DonorSpec.parse("demos:3").seed
('task:topic:0', 3)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from extraction.errors import InterventionError
from extraction.prompts import Prompt, PromptSet, assemble_prompt, sample_demos
from extraction.tasks import Task, load_task

#: Donor kinds and what each donor prompt is.
DONOR_KINDS = {
    "shuffled": "the same demonstrations and query, the demonstrations' labels permuted",
    "demos": "other demonstrations from the task's pool, the same query",
    "task": "demonstrations and a query of another task, with its template and label words",
}
FORMS = "shuffled, shuffled:SEED, demos:SEED, task:NAME or task:NAME:SEED"
#: Seeded permutations among which a ``shuffled`` donor takes the one that changes the most labels.
SHUFFLE_DRAWS = 64


@dataclass(frozen=True)
class DonorSpec:
    """Which donor prompt each base prompt gets (see the module docstring)."""

    kind: str
    seed: int = 0
    task: str | None = None

    @classmethod
    def parse(cls, text: str | DonorSpec) -> DonorSpec:
        """A spec from its text form; an InterventionError naming the accepted forms otherwise."""
        if isinstance(text, DonorSpec):
            return text
        parts = str(text).split(":") if isinstance(text, str) else []
        kind, rest = (parts[0], parts[1:]) if parts else ("", [])
        task = rest.pop(0) if kind == "task" and rest else None
        shapes = {"shuffled": len(rest) <= 1, "demos": len(rest) == 1, "task": bool(task) and len(rest) <= 1}
        if not shapes.get(kind) or (rest and not rest[0].isdigit()):
            raise InterventionError(f"unknown donor {text!r}; use {FORMS} (SEED a non-negative integer)")
        return cls(kind, int(rest[0]) if rest else 0, task)

    @property
    def text(self) -> str:
        """The canonical text form (what a record stores)."""
        return ":".join([self.kind, *([self.task] if self.task else []), str(self.seed)])

    @property
    def about(self) -> str:
        return DONOR_KINDS[self.kind]


def donor_prompts(spec: DonorSpec, task: Task, prompts: PromptSet, base: list[Prompt] | None = None
                  ) -> list[Prompt]:
    """The donor of each of ``base`` (default: every prompt of ``prompts``, the set ``task`` built)."""
    config = prompts.config
    other = load_task(spec.task) if spec.kind == "task" else None
    donors = []
    for prompt in prompts.prompts if base is None else base:
        rng = np.random.default_rng([spec.seed, prompt.query_index])
        if spec.kind == "shuffled":
            shown = _shuffled(np.array(prompt.demo_labels), rng)
            donors.append(assemble_prompt(prompts.template, config.separator, task, prompt.query_index,
                                          prompt.demo_indices, shown, prompts.label_words))
            continue
        source = other or task
        shots = len(prompt.demo_indices)
        demos = sample_demos(source, rng, shots, config.sampling) if shots else np.array([], int)
        shown = source.labels[demos]
        if spec.kind == "demos" and config.label_mode == "random":
            shown = rng.integers(task.n_classes, size=shots)
        if other is None:
            donors.append(assemble_prompt(prompts.template, config.separator, task, prompt.query_index, demos,
                                          shown, prompts.label_words))
        else:
            donors.append(assemble_prompt(other.template, config.separator, other, int(rng.choice(other.test)),
                                          demos, shown, other.label_words))
    return donors


def _shuffled(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``labels`` permuted: of :data:`SHUFFLE_DRAWS` seeded permutations, the first that changes the most of them."""
    draws = [labels[rng.permutation(len(labels))] for _ in range(SHUFFLE_DRAWS)]
    return draws[int(np.argmax([(draw != labels).sum() for draw in draws]))]
