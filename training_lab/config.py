"""Lab configurations: the synthetic task, the model and the training schedule, as TOML-able frozen dataclasses.

``LabConfig.to_dict()`` is plain ints/floats/bools/strings/lists (what a TOML file or a store's attrs hold) and
``LabConfig.from_dict`` reads it back, filling defaults; every config is validated when built, so an impossible
setting fails before any training with one line saying what to change. :data:`PRESETS` names ready-made configs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import torch

from training_lab.clamps import ClampSpec, check_all
from training_lab.errors import LabError


def _positive(owner: str, **values: int | float) -> None:
    for name, value in values.items():
        if value <= 0:
            raise LabError(f"{owner}.{name} must be positive, got {value}")


#: The extra evaluation sets a task can have, named as the :class:`TaskConfig` keys that size them.
HELDOUT_SETS = ("heldout_exemplars", "heldout_classes")


@dataclass(frozen=True)
class TaskConfig:
    """[M]'s meta-learning task (see :mod:`training_lab.tasks`); ``n_tasks=1, query_in_context=True`` is the plain
    induction copy task; ``relabel`` (with ``query_in_context``) draws the context's labels afresh for every
    sequence, distinct, from the ``n_labels`` labels, so only in-context learning solves it ([S]'s task with
    ``n_pairs=2``).

    Exemplars and held-out evaluation ([S]'s 50 training classes with one exemplar each, held-out exemplars and
    held-out classes): ``n_exemplars`` = 0 draws every item afresh around its class mean ([M]); n >= 1 gives every
    class n fixed exemplars, (mu_k + exemplar_spread * xi) / sqrt(1 + exemplar_spread^2) with xi ~ N(0, I/D),
    and an item is one of them plus the within-class noise epsilon. ``heldout_exemplars`` more exemplars per
    training class and ``heldout_classes`` more classes (with ``n_exemplars`` exemplars each; they need
    ``relabel``, since a held-out class has no label of its own) are never trained on and form the extra
    evaluation sets :attr:`evaluation_sets`."""

    n_tasks: int = 3
    n_classes: int = 64
    n_labels: int = 32
    n_pairs: int = 4
    item_dims: int = 63
    position_dims: int = 65
    epsilon: float = 0.1
    query_in_context: bool = False
    relabel: bool = False
    n_exemplars: int = 0
    exemplar_spread: float = 0.5
    heldout_exemplars: int = 0
    heldout_classes: int = 0

    def __post_init__(self) -> None:
        _positive("task", n_tasks=self.n_tasks, n_classes=self.n_classes, n_labels=self.n_labels,
                  n_pairs=self.n_pairs, item_dims=self.item_dims, position_dims=self.position_dims)
        for name in ("epsilon", "n_exemplars", "exemplar_spread", "heldout_exemplars", "heldout_classes"):
            if getattr(self, name) < 0:
                raise LabError(f"task.{name} must be >= 0, got {getattr(self, name)}")
        if self.heldout_exemplars and not self.n_exemplars:
            raise LabError("task.heldout_exemplars needs task.n_exemplars >= 1 (fixed exemplars per class)")
        if self.heldout_classes and not self.relabel:
            raise LabError("task.heldout_classes needs task.relabel = true (a held-out class has no label of its "
                           "own; its label comes from the context)")
        if 0 < self.heldout_classes < self.n_pairs:
            raise LabError(f"task.heldout_classes ({self.heldout_classes}) is below task.n_pairs ({self.n_pairs}): "
                           "a held-out context needs distinct held-out classes")
        if self.n_pairs > self.n_classes:
            raise LabError(f"task.n_pairs ({self.n_pairs}) exceeds task.n_classes ({self.n_classes}): a context "
                           "needs distinct classes; lower n_pairs or raise n_classes")
        if self.relabel and not self.query_in_context:
            raise LabError("task.relabel needs task.query_in_context = true (the query's label comes from the "
                           "context)")
        if self.relabel and self.n_pairs > self.n_labels:
            raise LabError(f"task.relabel needs n_pairs ({self.n_pairs}) <= n_labels ({self.n_labels}): the "
                           "context's labels are distinct")
        if self.n_tasks > self.n_labels:
            raise LabError(f"task.n_tasks ({self.n_tasks}) exceeds the {self.n_labels} distinct label maps "
                           "(shifts mod n_labels); lower n_tasks or raise n_labels")
        if self.position_dims < self.seq_len:
            raise LabError(f"task.position_dims ({self.position_dims}) is shorter than the context of "
                           f"{self.seq_len} tokens (2 * n_pairs + 1); raise position_dims")

    @property
    def seq_len(self) -> int:
        return 2 * self.n_pairs + 1

    @property
    def evaluation_sets(self) -> tuple[str, ...]:
        """The held-out evaluation sets: ``train`` (new sequences of the training classes and exemplars), then
        ``heldout_exemplars`` and ``heldout_classes`` where configured."""
        return ("train",) + tuple(name for name in HELDOUT_SETS if getattr(self, name))

    @property
    def token_dims(self) -> int:
        """Width of a token vector: content (item or label vector) then the position one-hot."""
        return self.item_dims + self.position_dims


#: The read-outs a lab model can have, by their config name.
READOUTS = ("mlp", "linear")


@dataclass(frozen=True)
class ModelConfig:
    """The attention-only transformer of :mod:`training_lab.model`.

    ``embed="identity"`` feeds the token vectors straight in (needs ``token_dims == width``, as in [M]: 63 + 65 =
    128); ``"linear"`` learns a projection. ``output_projection`` is W_O ([M]'s paper has it, its code does not).
    ``scale_scores`` divides attention scores by sqrt(head width) ([M] does not). ``pre_norm`` applies a LayerNorm
    (learned gain and bias) to each block's input and to the read-out's input ([S]'s pre-LayerNorm; [M] has none).
    ``positions = "rotary"`` rotates queries and keys by their positions ([S]'s rotary embeddings, base 10000;
    needs an even head width); ``"none"`` leaves position to the tokens' one-hot code ([M]). ``readout = "mlp"``
    is [M]'s two-layer ReLU read-out (hidden width ``readout_width``); ``"linear"`` is one matrix from the width to
    the labels, without bias ([S]'s unembedding; ``readout_width`` is then unused).
    """

    width: int = 128
    n_blocks: int = 2
    n_heads: int = 1
    readout_width: int = 128
    output_projection: bool = True
    scale_scores: bool = False
    embed: str = "identity"
    pre_norm: bool = False
    positions: str = "none"
    readout: str = "mlp"

    def __post_init__(self) -> None:
        _positive("model", width=self.width, n_blocks=self.n_blocks, n_heads=self.n_heads,
                  readout_width=self.readout_width)
        if self.width % self.n_heads:
            raise LabError(f"model.width ({self.width}) must be a multiple of model.n_heads ({self.n_heads})")
        if self.embed not in ("identity", "linear"):
            raise LabError(f"model.embed must be 'identity' or 'linear', got {self.embed!r}")
        if self.readout not in READOUTS:
            raise LabError(f"model.readout must be one of {', '.join(READOUTS)}, got {self.readout!r}")
        if self.positions not in ("none", "rotary"):
            raise LabError(f"model.positions must be 'none' or 'rotary', got {self.positions!r}")
        if self.positions == "rotary" and (self.width // self.n_heads) % 2:
            raise LabError(f"rotary positions need an even head width, got {self.width // self.n_heads} "
                           "(model.width / model.n_heads); change the width or the number of heads")


#: The optimizers a lab run can use, by their config name (Adam with torch's default betas and eps).
OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}


@dataclass(frozen=True)
class TrainConfig:
    """``optimizer`` (plain ``"sgd"``, or ``"adam"`` with torch's defaults betas (0.9, 0.999), eps 1e-8, as [S])
    on the query's cross-entropy; all ``seeds`` train at once as one batched model (both optimizers act per
    element, so a run's updates do not depend on the other runs).

    Evaluation (held-out loss and accuracy) happens at step 0, every ``eval_every`` steps, at
    ``evals_per_decade`` log-spaced steps per decade, and at the last step. Snapshots (attention patterns and
    query states of ``snapshot_examples`` fixed examples) are taken at ``snapshots_per_decade`` log-spaced steps
    and at the last step. Checkpoints are written every ``checkpoint_every`` steps (rounded to evaluation steps);
    only the latest is kept unless ``keep_checkpoints`` (for analyses at any checkpoint, such as
    :func:`training_lab.ablation.ablate_heads`).
    ``snapshot_examples`` defaults to 512: separability's probe holds out half of them, and with L = 32 labels
    fewer leave too few queries per label (the geometry helper's advice: at least 512).
    """

    steps: int = 1_000_000
    batch_size: int = 128
    lr: float = 0.01
    seeds: tuple[int, ...] = (0,)
    eval_every: int = 1000
    evals_per_decade: int = 10
    eval_examples: int = 1024
    snapshots_per_decade: int = 5
    snapshot_examples: int = 512
    checkpoint_every: int = 10_000
    optimizer: str = "sgd"
    keep_checkpoints: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "seeds", tuple(int(seed) for seed in self.seeds))
        if self.optimizer not in OPTIMIZERS:
            raise LabError(f"train.optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        _positive("train", steps=self.steps, batch_size=self.batch_size, lr=self.lr, eval_every=self.eval_every,
                  evals_per_decade=self.evals_per_decade, eval_examples=self.eval_examples,
                  snapshots_per_decade=self.snapshots_per_decade, snapshot_examples=self.snapshot_examples,
                  checkpoint_every=self.checkpoint_every)
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise LabError(f"train.seeds must be a non-empty list of distinct seeds, got {list(self.seeds)}")
        if self.snapshot_examples > self.eval_examples:
            raise LabError(f"train.snapshot_examples ({self.snapshot_examples}) exceeds train.eval_examples "
                           f"({self.eval_examples}); snapshots use the first evaluation examples")


@dataclass(frozen=True)
class LabConfig:
    """One lab run: task, model, training and clamps (:mod:`training_lab.clamps`, applied at every step and in
    every evaluation); ``to_dict``/``from_dict`` round-trip through TOML-able dicts, the clamps as a ``clamp``
    list (``[[clamp]]`` tables in TOML), left out when empty so an unclamped run's config is as before."""

    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    clamps: tuple[ClampSpec, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "clamps", tuple(self.clamps))
        check_all(self.clamps, self.model, self.task)
        if self.model.embed == "identity" and self.task.token_dims != self.model.width:
            raise LabError(f"model.embed = 'identity' needs token width item_dims + position_dims "
                           f"({self.task.token_dims}) equal to model.width ({self.model.width}); set "
                           "model.embed = 'linear' or change the widths")

    def to_dict(self) -> dict[str, Any]:
        data = {name: asdict(getattr(self, name)) for name in ("task", "model", "train")}
        data["train"]["seeds"] = list(self.train.seeds)
        if self.clamps:
            data["clamp"] = [spec.to_dict() for spec in self.clamps]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LabConfig":
        """Build from a (possibly partial) dict such as a TOML file's; unknown sections or keys are refused."""
        parts = {"task": TaskConfig, "model": ModelConfig, "train": TrainConfig}
        unknown = set(data) - set(parts) - {"clamp"}
        if unknown:
            raise LabError(f"unknown config section(s) {sorted(unknown)}; valid sections: {sorted(parts)}, clamp")
        built: dict[str, Any] = {"clamps": tuple(ClampSpec.from_dict(dict(c)) for c in data.get("clamp", []))}
        for name, kind in parts.items():
            values = dict(data.get(name, {}))
            valid = {f.name for f in fields(kind)}
            extra = set(values) - valid
            if extra:
                raise LabError(f"unknown key(s) {sorted(extra)} in [{name}]; valid keys: {sorted(valid)}")
            if "seeds" in values:
                values["seeds"] = tuple(values["seeds"])
            built[name] = kind(**values)
        return cls(**built)

    def with_seeds(self, seeds: tuple[int, ...] | list[int]) -> "LabConfig":
        return replace(self, train=replace(self.train, seeds=tuple(seeds)))


#: Ready-made configs. ``paper``: [M]'s default setting (T=3, K=64, L=32, N=4, D=63, 65 positions, width 128,
#: SGD lr 0.01, batch 128), trained for 1e6 steps. ``quick``: [M]'s task and model scaled down (K = L = 16
#: classes and labels, 31 item dimensions + 33 positions = width 64, read-out width 64), SGD at lr 0.05 (five times
#: [M]'s, so the phases come within 2,500 steps) and one seed; on this 2-core CPU its accuracy plateaus near 0.2
#: for a few hundred steps, then rises to about 0.97 (see the README for the measured time and phases).
PRESETS: dict[str, LabConfig] = {
    "paper": LabConfig(),
    "quick": LabConfig(
        task=TaskConfig(n_tasks=3, n_classes=16, n_labels=16, n_pairs=4, item_dims=31, position_dims=33),
        model=ModelConfig(width=64, readout_width=64),
        train=TrainConfig(steps=2_500, lr=0.05, eval_every=100, evals_per_decade=5, eval_examples=512,
                          snapshots_per_decade=3, snapshot_examples=512, checkpoint_every=500, seeds=(0,)),
    ),
}


#: [S]'s setting (Singh et al. 2024): exemplar, label, exemplar, label, query with labels re-drawn per sequence from
#: 5; 50 Gaussian training classes with one exemplar each plus within-class noise epsilon 0.1 ([S] uses Omniglot
#: features, not available here), evaluated also on 5 held-out exemplars per training class (exemplar spread 0.5)
#: and on 50 held-out classes; 2 blocks of 8 heads at width 64 (59 item dimensions + 5 positions), pre-LayerNorm,
#: rotary positions, a linear read-out ([S]'s unembedding), Adam at lr 1e-5, batch 32, 31,000 steps.
#: ``singh-quick``: the same at lr 1e-3 for 1,500 steps (see the README for its measured phase change).
_SINGH = LabConfig(
    task=TaskConfig(n_tasks=1, n_classes=50, n_labels=5, n_pairs=2, item_dims=59, position_dims=5,
                    query_in_context=True, relabel=True, n_exemplars=1, heldout_exemplars=5, heldout_classes=50),
    model=ModelConfig(width=64, n_blocks=2, n_heads=8, scale_scores=True, pre_norm=True, positions="rotary",
                      readout="linear"),
    train=TrainConfig(steps=31_000, batch_size=32, lr=1e-5, optimizer="adam", eval_every=500, evals_per_decade=5,
                      eval_examples=512, snapshots_per_decade=3, snapshot_examples=512, checkpoint_every=5_000,
                      keep_checkpoints=True),
)
PRESETS["singh"] = _SINGH
PRESETS["singh-quick"] = replace(_SINGH, train=replace(_SINGH.train, steps=1_500, lr=1e-3, eval_every=100,
                                                        checkpoint_every=500))


def preset(name: str) -> LabConfig:
    """A named preset config; unknown names fail listing the valid ones."""
    if name not in PRESETS:
        raise LabError(f"unknown lab preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


def log_steps(last: int, per_decade: int) -> list[int]:
    """``per_decade`` log-spaced integer steps per decade from 1 up to ``last`` (inclusive), plus 0 and ``last``."""
    count = max(1, int(math.ceil(math.log10(max(last, 1)) * per_decade)))
    steps = {0, last} | {int(round(10 ** (i / per_decade))) for i in range(count + 1)}
    return sorted(step for step in steps if step <= last)


def overlay(data: dict[str, Any], changes: dict[str, Any], source: str) -> dict[str, Any]:
    """``data`` (a ``LabConfig.to_dict()``) with the sections of ``changes`` (a TOML file's tables) merged key by key;
    a list section (``clamp``) is replaced whole. ``source`` names the changes in the error for a malformed section."""
    merged = {name: dict(values) if isinstance(values, dict) else values for name, values in data.items()}
    for section, values in changes.items():
        if section in merged and isinstance(merged[section], dict) and not isinstance(values, dict):
            raise LabError(f"{source}: [{section}] must be a table of keys, got {values!r}")
        merged[section] = {**merged.get(section, {}), **values} if isinstance(values, dict) else values
    return merged
