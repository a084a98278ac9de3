"""The project's exceptions: every error a user can cause is one of these, with a message that says what to do."""

from __future__ import annotations

from typing import Any


class ICLGeometryError(ValueError):
    """Base class of every user-facing error raised by the toolkit."""


class ModelLoadError(ICLGeometryError):
    """A model spec could not be resolved or loaded."""


class ArchitectureError(ICLGeometryError):
    """The model's module tree could not be mapped onto layers, norm, unembedding and attention."""


class TaskError(ICLGeometryError):
    """A task or data file is unknown, malformed or too small for the request."""


class LabelWordError(ICLGeometryError):
    """Label words do not tokenize to distinct usable first tokens."""


class PromptError(ICLGeometryError):
    """A prompt cannot be built or does not fit the model."""


class AnswerTokenError(ICLGeometryError):
    """The answer of a string-to-string task cannot be read from the prompt's tokens (none, or run together)."""


class StoreError(ICLGeometryError):
    """A store or group is missing, malformed, or holds a different configuration."""


class ClusterError(ICLGeometryError):
    """A Dask cluster for sharded extraction cannot be reached, or its workers cannot run or see the run."""


class InterventionError(ICLGeometryError):
    """An intervention (head ablation, injection, ...) does not fit the model or is passed in a form that is refused."""


class GroupClashError(StoreError):
    """A store group exists but was written with another configuration. ``problem`` says what clashes and
    ``remedy`` what to do (for the Python API); ``path``, ``group`` and ``changed`` (the differing keys) let a
    caller replace the group or name its own way to do so (the CLI names its flag, the study its ``--restart``)."""

    def __init__(self, problem: str, *, path: Any, group: str, changed: list[str] | None = None,
                 remedy: str = "pass overwrite=True to replace it"):
        super().__init__(f"{problem}; {remedy}")
        self.problem, self.path, self.group, self.changed = problem, path, group, list(changed or [])
