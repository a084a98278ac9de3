"""Helpers for tests that interrupt lab runs."""

from __future__ import annotations

import pytest

from training_lab.config import LabConfig


def train_interrupted(config: LabConfig, out, step: int) -> None:
    """Start ``train(config, out)`` and stop it with a KeyboardInterrupt once it reaches ``step``."""
    from training_lab import train

    def stop(reached: int) -> None:
        if reached == step:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config, out, progress=False, on_step=stop)
