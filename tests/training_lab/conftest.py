"""A tiny lab config for fast tests."""

from __future__ import annotations

import pytest
import torch

from training_lab.config import LabConfig, ModelConfig, TaskConfig, TrainConfig


@pytest.fixture
def tiny() -> LabConfig:
    return LabConfig(
        task=TaskConfig(n_tasks=2, n_classes=8, n_labels=6, n_pairs=2, item_dims=5, position_dims=5),
        model=ModelConfig(width=10, readout_width=8),
        train=TrainConfig(steps=30, batch_size=16, lr=0.05, seeds=(0,), eval_every=5, evals_per_decade=2,
                          eval_examples=32, snapshots_per_decade=2, snapshot_examples=8, checkpoint_every=10),
    )


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a busy machine idle OpenMP workers cost milliseconds per op."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
