"""How well a model does a string-to-string task: the answer's first token, and exact greedy generation of the answer.

Batched greedy decoding with left padding; the first step is the plain next-token prediction at the final position.
With interventions every step is one forward pass over the whole sequence so far (prompt and tokens written), with
no key/value cache, so an intervention sees each step's full batch exactly as ``extract`` shows it one
(:class:`~extraction.interventions.Batch`); without, later steps feed only the new token with the model's cache.
Interventions see the prompts' position groups (:attr:`PairPrompt.segments`), and the tokens written so far join
the final group: each is the position that predicts the answer's next token, so a knockout of ``y->final`` keeps
every step of the answer from reading the demonstrations' outputs. A row stops at the end-of-sequence token or once
its answer (the text written, leading whitespace dropped) contains a stop string: the task's separator or a newline. The answer is the text before the stop, stripped; it
is exact when it equals the gold answer stripped.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from extraction.capture import forward_last, position_ids
from extraction.errors import PromptError
from extraction.interventions import Batch, Intervention, as_interventions, intervening
from extraction.models import LoadedModel
from extraction.pair_tasks import PairPrompt, PairPromptConfig, PairTask, answer_tokens, build_pair_prompts, \
    load_pair_task
from extraction.positions import FINAL, PositionGroups
from extraction.prompts import check_lengths, encode

#: Tokens written beyond the longest gold answer (in its tokens) before a row that has not stopped is cut off.
EXTRA_TOKENS = 3


def stop_strings(separator: str) -> tuple[str, ...]:
    """The strings that end an answer: the separator (when not empty) and a newline."""
    return tuple(dict.fromkeys(s for s in (separator, "\n") if s))


@dataclass(frozen=True)
class Generation:
    """What greedy decoding wrote after one prompt: the first step's choice (the next-token prediction at the final
    position, an end-of-sequence token included), the tokens written, the answer text, whether it stopped by itself,
    and the first step's logits of the tracked tokens."""

    first_token: int
    tokens: tuple[int, ...]
    text: str
    stopped: bool
    tracked_logits: tuple[float, ...] = ()


def cut_answer(continuation: str, stops: Sequence[str]) -> tuple[str, bool]:
    """The answer in ``continuation`` (leading whitespace dropped, cut before the first stop string, stripped) and
    whether a stop string was found."""
    answer = continuation.lstrip()
    cuts = [answer.find(stop) for stop in stops if stop in answer]
    return (answer[: min(cuts)].strip(), True) if cuts else (answer.strip(), False)


def _continuation(tokenizer, prompt_ids: list[int], new: list[int]) -> str:
    """The text that ``new`` adds after the prompt (decoded in context, so a leading space is kept)."""
    base = tokenizer.decode(prompt_ids, skip_special_tokens=True)
    full = tokenizer.decode(prompt_ids + new, skip_special_tokens=True)
    return full[len(base):] if full.startswith(base) else tokenizer.decode(new, skip_special_tokens=True)


def _stop_ids(loaded: LoadedModel) -> set[int]:
    """End-of-sequence ids of the tokenizer and of the model's generation config."""
    ids = {loaded.tokenizer.eos_token_id}
    config_ids = getattr(getattr(loaded.model, "generation_config", None), "eos_token_id", None)
    ids.update(config_ids if isinstance(config_ids, (list, tuple)) else [config_ids])
    return {int(i) for i in ids if i is not None}


@torch.no_grad()
def greedy_generate(loaded: LoadedModel, prompts: Sequence[PairPrompt], *, stops: Sequence[str],
                    max_new_tokens: int, interventions: Sequence[Intervention] = (), batch_size: int = 8,
                    track: Sequence[Sequence[int]] | None = None) -> list[Generation]:
    """Greedy answers to ``prompts`` (see the module docstring), ``interventions`` applied around every forward pass.

    ``track`` gives, per prompt, token ids whose logits at the first step (the final position) are returned. Without
    interventions the steps after the first reuse the model's key/value cache (the same tokens, much faster).
    """
    tokenizer = loaded.tokenizer
    if tokenizer.padding_side != "left":
        raise PromptError("the tokenizer must pad on the left so the final position is the last one")
    if max_new_tokens < 1 or batch_size < 1:
        raise PromptError(f"max_new_tokens and batch_size must be >= 1, not {max_new_tokens} and {batch_size}")
    lengths = np.array([len(ids) for ids in tokenizer([p.text for p in prompts])["input_ids"]])
    check_lengths(lengths, prompts, loaded.arch.max_context)
    stop_ids, results = _stop_ids(loaded), [None] * len(prompts)
    order = np.argsort(lengths, kind="stable")
    for start in range(0, len(order), batch_size):
        rows = [int(i) for i in order[start:start + batch_size]]
        for row, made in zip(rows, _generate_batch(loaded, [prompts[i] for i in rows], stops, stop_ids, max_new_tokens,
                                                   interventions, None if track is None else [track[i] for i in rows])):
            results[row] = made
    return results


def _generate_batch(loaded: LoadedModel, prompts: Sequence[PairPrompt], stops: Sequence[str], stop_ids: set[int],
                    max_new_tokens: int, interventions: Sequence[Intervention],
                    track: Sequence[Sequence[int]] | None) -> list[Generation]:
    """Greedy decoding of one left-padded batch; rows that have stopped ride along until all have."""
    tokenizer = loaded.tokenizer
    encoded = tokenizer([p.text for p in prompts], padding=True, return_tensors="pt")
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    # groups only for interventions (edge interventions need them); a plain evaluation takes any template
    groups = encode(tokenizer, list(prompts)).groups if interventions else None
    prompt_ids = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
    written: list[list[int]] = [[] for _ in prompts]
    done: list[Generation | None] = [None] * len(prompts)
    first, tracked, cache = [-1] * len(prompts), [()] * len(prompts), None
    for step in range(max_new_tokens):
        logits, cache = _step(loaded, Batch(ids, mask, _written_as_final(groups, step)), interventions, cache)
        chosen = logits.argmax(dim=-1)
        for row in range(len(prompts)):
            if done[row] is not None:
                continue
            token = int(chosen[row])
            if step == 0:
                first[row] = token
                tracked[row] = () if track is None else tuple(logits[row, list(track[row])].tolist())
            ended = token in stop_ids
            if not ended:
                written[row].append(token)
            text, stopped = cut_answer(_continuation(tokenizer, prompt_ids[row], written[row]), stops)
            if ended or stopped or step == max_new_tokens - 1:
                done[row] = Generation(first[row], tuple(written[row]), text, ended or stopped, tracked[row])
        if all(made is not None for made in done):
            break
        ids = torch.cat([ids, chosen[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=mask.dtype)], dim=1)
    return done


def _written_as_final(groups: PositionGroups | None, written: int) -> PositionGroups | None:
    """The prompt's groups followed by ``written`` tokens of the final group."""
    if groups is None:
        return None
    extra = (groups.kind.shape[0], written)
    return PositionGroups(torch.cat([groups.kind, torch.full(extra, FINAL, dtype=groups.kind.dtype)], 1),
                          torch.cat([groups.demo, torch.full(extra, -1, dtype=groups.demo.dtype)], 1))


def _step(loaded: LoadedModel, batch: Batch, interventions: Sequence[Intervention],
          cache: Any) -> tuple[torch.Tensor, Any]:
    """Next-token logits (B, V) on the CPU and the new key/value cache (None when interventions are applied: each
    step then runs over the whole sequence inside them)."""
    device, ids, mask = loaded.device, batch.input_ids, batch.attention_mask
    if interventions:
        with intervening(interventions, loaded.arch, batch):
            return forward_last(loaded.model, ids.to(device), mask.to(device)).cpu(), None
    positions = position_ids(mask)
    fed = slice(None) if cache is None else slice(-1, None)
    # transformers 5 calls the cache argument and output ``cache``, older versions ``past_key_values``.
    name = "cache" if "cache" in inspect.signature(loaded.model.forward).parameters else "past_key_values"
    output = loaded.model(input_ids=ids[:, fed].to(device), attention_mask=mask.to(device),
                          position_ids=positions[:, fed].to(device), use_cache=True, logits_to_keep=1,
                          **{name: cache})
    return output.logits[:, -1].float().cpu(), getattr(output, name)


@dataclass(frozen=True)
class PairResult:
    """One query: the gold answer and its first token, the model's first token and the gold token's logit there,
    the generated answer, and (ambiguous tasks) which readings the first token and the answer agree with."""

    query_index: int
    input: str
    answer: str
    answer_token: int
    predicted_token: int
    first_correct: bool
    answer_logit: float
    generated: str | None
    exact: bool | None
    stopped: bool | None
    readings_first: dict[str, bool] = field(default_factory=dict)
    readings_exact: dict[str, bool] = field(default_factory=dict)


@dataclass(frozen=True)
class PairEvaluation:
    """Per-query results of one pair task and setting, with the settings and the interventions' records."""

    task: str
    config: dict[str, Any]
    results: list[PairResult]
    interventions: list[dict[str, Any]]

    @property
    def first_token_accuracy(self) -> float:
        return float(np.mean([r.first_correct for r in self.results]))

    @property
    def exact_accuracy(self) -> float | None:
        """Share of exact generated answers (None when the evaluation did not generate)."""
        exact = [r.exact for r in self.results if r.exact is not None]
        return float(np.mean(exact)) if exact else None

    def reading_accuracy(self) -> dict[str, dict[str, float | None]]:
        """Per reading of an ambiguous task: the share of queries whose first token / whole answer it gives (when
        two readings start with the same token, a first token that matches counts for both)."""
        names = self.results[0].readings_first if self.results else {}
        return {name: {"first_token": float(np.mean([r.readings_first[name] for r in self.results])),
                       "exact": float(np.mean([r.readings_exact[name] for r in self.results]))
                       if self.exact_accuracy is not None else None}
                for name in names}

    def to_frame(self):
        """The per-query results as a pandas DataFrame (one row per query; readings as ``first_<name>`` and
        ``exact_<name>`` columns)."""
        import pandas as pd

        rows = []
        for r in self.results:
            row = {k: v for k, v in vars(r).items() if k not in ("readings_first", "readings_exact")}
            row.update({f"first_{k}": v for k, v in r.readings_first.items()})
            row.update({f"exact_{k}": v for k, v in r.readings_exact.items()})
            rows.append(row)
        return pd.DataFrame(rows)


def evaluate_pair_task(loaded: LoadedModel, task: str | PairTask, *, shots: int = 8, n: int = 32, seed: int = 0,
                       intervention: Intervention | Sequence[Intervention] | None = None, generate: bool = True,
                       max_new_tokens: int | None = None, batch_size: int = 8) -> PairEvaluation:
    """First-token and (with ``generate``) exact-generation accuracy of ``loaded`` on ``n`` seeded ``shots``-shot
    prompts of ``task`` (a built-in name, a file path or a :class:`PairTask`).

    ``intervention`` (an object such as ``HeadAblation`` or a list of them) is applied around every forward pass, as
    ``extract`` applies it, and recorded in the result. ``max_new_tokens`` defaults to the longest gold answer's
    tokens plus :data:`EXTRA_TOKENS`.
    """
    task = task if isinstance(task, PairTask) else load_pair_task(task)
    interventions = as_interventions(intervention)
    for item in interventions:
        item.check(loaded.arch)
    config = PairPromptConfig(shots=shots, n=n, seed=seed)
    prompts = build_pair_prompts(task, config)
    gold = [answer_tokens(loaded.tokenizer, p) for p in prompts]
    readings = [{name: answer_tokens(loaded.tokenizer, p, value) for name, value in p.readings.items()}
                for p in prompts]
    longest = max(len(tokens) for g, r in zip(gold, readings) for tokens in (g, *r.values()))
    steps = (max_new_tokens or longest + EXTRA_TOKENS) if generate else 1
    generations = greedy_generate(loaded, prompts, stops=stop_strings(task.separator), max_new_tokens=steps,
                                  interventions=interventions, batch_size=batch_size,
                                  track=[[tokens[0]] for tokens in gold])
    results = []
    for prompt, tokens, reading_tokens, made in zip(prompts, gold, readings, generations):
        first = made.first_token
        results.append(PairResult(
            query_index=prompt.query_index, input=task.inputs[prompt.query_index], answer=prompt.answer,
            answer_token=tokens[0], predicted_token=first, first_correct=first == tokens[0],
            answer_logit=made.tracked_logits[0],
            generated=made.text if generate else None,
            exact=made.text == prompt.answer.strip() if generate else None,
            stopped=made.stopped if generate else None,
            readings_first={name: first == value[0] for name, value in reading_tokens.items()},
            readings_exact={name: generate and made.text == prompt.readings[name].strip() for name in reading_tokens},
        ))
    settings = {**config.to_dict(), "template": task.template, "separator": task.separator,
                "max_new_tokens": steps, "model": loaded.provenance.get("model_spec", loaded.spec)}
    return PairEvaluation(task.name, settings, results, [item.describe() for item in interventions])
