import math

import pytest
import torch

from training_lab.config import LabConfig, ModelConfig, TaskConfig, TrainConfig, preset
from training_lab.errors import LabError
from training_lab.tasks import label_maps, make_world, sample


def _draw(task: TaskConfig, size: int = 4096, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    world = make_world(task, generator)
    return world, sample(task, world, size, generator)


def test_class_means_and_item_noise_have_the_stated_statistics():
    task = TaskConfig(n_classes=2000, n_labels=32, item_dims=40, position_dims=41, epsilon=0.3)
    world, batch = _draw(task)
    d = task.item_dims
    assert world.means.mean().abs() < 0.01
    assert world.means.var() == pytest.approx(1 / d, rel=0.05)
    items = batch.tokens[:, 0::2, :d]
    classes = torch.cat([batch.context_classes, batch.query_class[:, None]], dim=1)
    noise = (items * math.sqrt(1 + task.epsilon**2) - world.means[classes]) / task.epsilon
    assert noise.mean().abs() < 0.01
    assert noise.var() == pytest.approx(1 / d, rel=0.05)


def test_labels_follow_the_task_label_maps_and_shift_by_task():
    task = TaskConfig(n_tasks=3, n_classes=16, n_labels=8, n_pairs=4, item_dims=5, position_dims=9)
    world, batch = _draw(task)
    maps = label_maps(task, world)
    assert torch.equal(maps[1], (maps[0] + 1) % 8) and torch.equal(maps[2], (maps[0] + 2) % 8)
    assert torch.equal(batch.label, maps[batch.task, batch.query_class])
    pair_labels = world.label_vectors[maps[batch.task[:, None], batch.context_classes]]
    assert torch.equal(batch.tokens[:, 1::2, :task.item_dims], pair_labels)
    assert set(batch.task.tolist()) == {0, 1, 2}


def test_context_classes_are_distinct_and_the_query_is_absent_at_the_expected_rate():
    task = TaskConfig(n_tasks=3, n_classes=16, n_labels=8, n_pairs=4, item_dims=5, position_dims=9)
    _, batch = _draw(task, size=20000)
    assert all(len(set(row)) == task.n_pairs for row in batch.context_classes.tolist())
    absent = 1 - batch.query_in_context.float().mean().item()
    assert absent == pytest.approx(1 - task.n_pairs / task.n_classes, abs=0.015)
    present = (batch.context_classes == batch.query_class[:, None]).any(dim=1)
    assert torch.equal(present, batch.query_in_context)


def test_induction_copy_task_always_has_the_query_in_context():
    task = TaskConfig(n_tasks=1, n_classes=16, n_labels=8, n_pairs=4, item_dims=5, position_dims=9,
                      query_in_context=True)
    _, batch = _draw(task)
    assert batch.query_in_context.all()


def test_position_code_is_one_hot_by_token_index_and_sampling_is_seeded():
    task = TaskConfig(n_tasks=2, n_classes=8, n_labels=4, n_pairs=3, item_dims=5, position_dims=10)
    _, batch = _draw(task, size=16)
    code = batch.tokens[:, :, task.item_dims:]
    assert torch.equal(code, torch.eye(10)[:7].expand(16, 7, 10))
    _, again = _draw(task, size=16)
    assert torch.equal(batch.tokens, again.tokens)
    _, other = _draw(task, size=16, seed=1)
    assert not torch.equal(batch.tokens, other.tokens)


@pytest.mark.parametrize("kwargs, words", [
    ({"n_pairs": 9, "n_classes": 8}, "n_pairs (9) exceeds task.n_classes (8)"),
    ({"n_tasks": 5, "n_labels": 4}, "n_tasks (5) exceeds the 4 distinct label maps"),
    ({"n_pairs": 4, "position_dims": 8}, "position_dims (8) is shorter than the context of 9 tokens"),
])
def test_impossible_task_settings_fail_with_one_line(kwargs, words):
    with pytest.raises(LabError, match=words.replace("(", r"\(").replace(")", r"\)")) as error:
        TaskConfig(**{"item_dims": 5, "position_dims": 9, **kwargs})
    assert "\n" not in str(error.value)


def test_config_round_trips_through_a_plain_dict_and_refuses_unknown_keys():
    config = preset("quick")
    data = config.to_dict()
    assert LabConfig.from_dict(data) == config
    assert isinstance(data["train"]["seeds"], list)
    with pytest.raises(LabError, match="unknown key"):
        LabConfig.from_dict({"train": {"step": 3}})
    with pytest.raises(LabError, match="model.width"):
        LabConfig(task=TaskConfig(item_dims=5, position_dims=9), model=ModelConfig(width=16), train=TrainConfig())
    with pytest.raises(LabError, match="valid presets: paper, quick"):
        preset("fast")


def test_relabel_draws_distinct_labels_per_sequence_and_the_query_takes_its_class_label():
    task = TaskConfig(n_tasks=1, n_classes=50, n_labels=5, n_pairs=2, item_dims=11, position_dims=5,
                      query_in_context=True, relabel=True)
    generator = torch.Generator().manual_seed(0)
    batch = sample(task, make_world(task, generator), 400, generator)
    context_labels = batch.tokens[:, 1::2, :11]  # label vectors of the context
    world = make_world(task, torch.Generator().manual_seed(0))
    ids = (context_labels[:, :, None] - world.label_vectors).abs().sum(-1).argmin(-1)  # (B, N)
    assert (ids[:, 0] != ids[:, 1]).all()
    slot = (batch.context_classes == batch.query_class[:, None]).float().argmax(1)
    assert torch.equal(batch.label, ids.gather(1, slot[:, None]).squeeze(1))
    same = batch.context_classes[:, 0] == batch.context_classes[0, 0]
    assert len(set(ids[same, 0].tolist())) > 1  # a class's label changes between sequences
    with pytest.raises(LabError, match="task.relabel needs task.query_in_context"):
        TaskConfig(n_pairs=2, relabel=True)
