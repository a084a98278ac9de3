"""Edge scans on string-to-string pair tasks: fast equals naive, cells agree with the pair evaluation under the same
knockout (first token and exact generation), ambiguous readings, bad input."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from extraction.edges import EdgeKnockout
from extraction.errors import TaskError
from extraction.models import load_model
from extraction.pair_eval import evaluate_pair_task
from extraction.pair_tasks import load_pair_task
from heads.errors import HeadsError
from heads.flow import edge_scan, flow_table
from tests.extraction.test_pair_eval import WORDS, word_task

SETTINGS = dict(shots=3, n=4, seed=1, width=2, batch_size=3, n_boot=200, progress=False)


def ambiguous_word_task():
    """Word-level data with two readings that differ on every example: the next word in WORDS, or the same word."""
    task = word_task()
    return dataclasses.replace(task, readings={"next": task.outputs, "same": WORDS})


def task_for(name: str):
    """Built-in data for the byte-level tokenizer; words it knows for the word-level one."""
    return load_pair_task("country_capital") if name == "qwen2" else ambiguous_word_task()


@pytest.fixture(scope="module", params=["gemma3", "qwen2", "llama"])
def tiny(request, tiny_model_dirs):
    return request.param, load_model(str(tiny_model_dirs[request.param]))


def test_fast_pair_scan_equals_naive_loop(tiny):
    name, loaded = tiny
    fast = edge_scan(loaded, task=task_for(name), method="fast", **SETTINGS)
    naive = edge_scan(loaded, task=task_for(name), method="naive", **SETTINGS)
    np.testing.assert_allclose(fast["answer_logits"], naive["answer_logits"], atol=1e-4, rtol=1e-4)
    np.testing.assert_array_equal(fast["top_token"], naive["top_token"])
    for quantity in ("accuracy", "accuracy_change", "logit_change", "logit_change_low"):
        np.testing.assert_allclose(fast[quantity], naive[quantity], atol=1e-4)
    assert np.abs(fast["logit_change"].values).max() > 1e-4  # the knockouts do something


def test_pair_cells_agree_with_the_pair_evaluation_under_the_same_knockout(tiny_model_dirs):
    """First-token accuracy, the gold token's logit and exact generation of a cell equal ``evaluate_pair_task`` with
    that knockout as its intervention; readings of an ambiguous task are counted per reading."""
    loaded = load_model(str(tiny_model_dirs["gemma3"]))
    task = ambiguous_word_task()
    ds = edge_scan(loaded, task=task, generate=[("y->final", 1), ("x->y", 0)], **SETTINGS)
    assert ds.attrs["readings"] == ["next", "same"] and list(ds["answer"].values) == ["gold", "next", "same"]
    assert ds.attrs["generated_cells"] == ["y->final@1", "x->y@0"]
    evaluation = dict(shots=SETTINGS["shots"], n=SETTINGS["n"], seed=SETTINGS["seed"], batch_size=3)
    clean = evaluate_pair_task(loaded, task, **evaluation)
    assert ds.attrs["clean_accuracy"] == pytest.approx(clean.first_token_accuracy)
    assert ds.attrs["clean_exact_accuracy"] == pytest.approx(clean.exact_accuracy)
    for reading, accuracy in clean.reading_accuracy().items():
        assert ds.attrs[f"clean_reading_{reading}"] == pytest.approx(accuracy["first_token"])
        assert ds.attrs[f"clean_exact_{reading}"] == pytest.approx(accuracy["exact"])
    for edge, first in (("y->final", 1), ("x->y", 0)):
        cell = ds.sel(edge=edge, window=first)
        blocked = evaluate_pair_task(loaded, task, intervention=EdgeKnockout(edge, [first, first + 1]), **evaluation)
        assert float(cell["accuracy"]) == pytest.approx(blocked.first_token_accuracy)
        assert float(cell["exact"]) == pytest.approx(blocked.exact_accuracy)
        assert float(cell["exact_change"]) == pytest.approx(blocked.exact_accuracy - clean.exact_accuracy)
        np.testing.assert_allclose(cell["logit_change"], np.mean([b.answer_logit - c.answer_logit for b, c in
                                                                  zip(blocked.results, clean.results)]), atol=1e-4)
        for reading, accuracy in blocked.reading_accuracy().items():
            assert float(cell[f"reading_{reading}"]) == pytest.approx(accuracy["first_token"])
            assert float(cell[f"exact_{reading}"]) == pytest.approx(accuracy["exact"])
    # cells not generated are NaN in the Dataset and absent from the table
    assert np.isnan(float(ds["exact"].sel(edge="y->y", window=0)))
    table = flow_table(ds)
    assert len(table[table["quantity"] == "exact"]) == 2
    assert {"reading_next", "reading_same_change", "exact_same"} <= set(table["quantity"])


def test_a_user_file_with_input_and_output_columns_scans_as_a_pair_task(tiny_model_dirs, tmp_path):
    loaded = load_model(str(tiny_model_dirs["gemma3"]))
    task = word_task()
    path = tmp_path / "words.csv"
    path.write_text("input,output,split\n" + "".join(
        f"{x},{y},{'train' if i in task.train else 'test'}\n" for i, (x, y) in enumerate(zip(task.inputs,
                                                                                             task.outputs))))
    from_file = edge_scan(loaded, task=str(path), edges=["y->final"], template="{input} : {output}", **SETTINGS)
    in_memory = edge_scan(loaded, task=task, edges=["y->final"], **SETTINGS)
    np.testing.assert_allclose(from_file["answer_logits"], in_memory["answer_logits"], atol=1e-5)
    assert from_file.attrs["prompts"]["task"] == "words"


def test_bad_pair_scan_input(tiny_model_dirs, tmp_path):
    loaded = load_model(str(tiny_model_dirs["gemma3"]))
    with pytest.raises(HeadsError, match="cannot generate under y->x in the window starting at block 7"):
        edge_scan(loaded, task=word_task(), generate=[("y->x", 7)], **SETTINGS)
    with pytest.raises(HeadsError, match="applies to string-to-string pair tasks; 'sentiment' is a classification"):
        edge_scan(loaded, task="sentiment", generate=[("y->x", 0)], **SETTINGS)
    with pytest.raises(HeadsError, match="label_mode do not apply to the pair task"):
        edge_scan(loaded, task=word_task(), label_mode="symbolic", **SETTINGS)
    path = tmp_path / "half.csv"
    path.write_text("input,answer\nyes,no\n")
    with pytest.raises(TaskError, match="missing column"):
        edge_scan(loaded, task=str(path), **SETTINGS)
    with pytest.raises(HeadsError, match="patching edges applies to classification tasks"):
        edge_scan(loaded, task=word_task(), mode="patch", **SETTINGS)
