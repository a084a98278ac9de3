"""The training lab: small attention-only transformers trained on synthetic in-context tasks ([M]'s meta-learning
task), several seeds at once, with every intermediate behind a named hook point and a run store that records
how attention circuits and hidden-state geometry change over training.

Use::

    from training_lab import analyse, preset, train, open_run
    curves = train(preset("quick"), out="runs/quick")        # resumes if runs/quick holds the same config
                                                             # (extends it if that config has fewer train.steps)
    snapshots = open_run("runs/quick", "snapshots")
    analyse("runs/quick")                                    # tables/, figures/ and report.html in runs/quick

Modules: :mod:`~training_lab.config` (TOML-able configs and presets), :mod:`~training_lab.tasks` (vectorised
generators), :mod:`~training_lab.hooks` (hook points, cache / ablate / clamp context managers),
:mod:`~training_lab.model` (the batched hooked transformer), :mod:`~training_lab.clamps` (declarative clamps
applied in every training step and evaluation), :mod:`~training_lab.train` (the trainer),
:mod:`~training_lab.store` and :mod:`~training_lab.checkpoints` (the run directory); the analysis:
:mod:`~training_lab.circuits` ([M]'s metrics), :mod:`~training_lab.induction` ([S]'s induction strength and
phase-change time), :mod:`~training_lab.phases` (phases and their circuits),
:mod:`~training_lab.ablation` (per-head ablation at any checkpoint),
:mod:`~training_lab.geometry_over_training`, :mod:`~training_lab.figures` and :mod:`~training_lab.report`
(:func:`analyse`: all of them from a run store into tables, figures and ``report.html``);
:mod:`~training_lab.cli` (``icl-geometry train``); experiment sets: :mod:`~training_lab.experiments` (TOML files of
configurations, e.g. [S]'s clamp runs and data sweeps, each trained batched in its own run directory) and
:mod:`~training_lab.compare` (phase-change times with intervals over seeds, curves side by side, ``compare.html``).

Run directory ``out``: ``run.zarr`` (Zarr v3, consolidated metadata at the root; root attrs ``config`` (the
:class:`LabConfig` as a dict, its clamps as a ``clamp`` list when any), ``provenance`` (library versions) and
``format``) and ``checkpoints/step_<8 digits>.safetensors`` (the latest checkpoint, or every one with
``train.keep_checkpoints``: weights with a leading run dimension, the training data generators' states).
``step`` counts optimizer updates done (step 0 = initial weights). ``seed`` indexes the batched runs (coordinate:
the seeds); each run has its own world (class means, label vectors, label maps), batches and evaluation set.
``block`` is an attention block 0..n_blocks-1; ``layer`` is a residual-state index (0 = the embedding input,
l = output of block l-1), as everywhere in the toolkit. Positions ``query`` / ``key`` are token indices 0..2N
(0-indexed: items 0, 2, .., labels 1, 3, .., the query 2N; [M]'s 1-indexed p_{2N+1, 2k} is ``query=2N, key=2k-1``).

Group ``curves`` (every evaluation step, on the run's ``eval_examples`` held-out contexts):

================  ==========================================  ===================================================
variable          dims                                        meaning
================  ==========================================  ===================================================
``loss``          step, seed                                  held-out cross-entropy of the query
``accuracy``      step, seed                                  held-out accuracy of the query's label
``train_loss``    step, seed                                  mean training loss since the previous evaluation
                                                              (NaN at step 0)
``mean_pattern``  step, seed, block, head, query, key         attention pattern averaged over the held-out set
                                                              (the circuit metrics are linear in it)
``heldout_*``     step, seed, heldout                         ``heldout_loss`` and ``heldout_accuracy`` on each
                                                              extra evaluation set (``heldout``: held-out
                                                              exemplars or classes, where the task has them)
``done``          step                                        written completely (written last)
================  ==========================================  ===================================================

Group ``snapshots`` (log-spaced steps and the last, on the first ``snapshot_examples`` held-out contexts):

====================  ===============================================  ===========================================
variable              dims                                             meaning
====================  ===============================================  ===========================================
``pattern``           step, seed, block, head, example, query, key     attention patterns
``hidden``            step, seed, layer, example, dim                  the query position's residual state
``readout_hidden``    step, seed, example, unit                        MLP read-out only: its hidden layer
                                                                       relu(W_1 h + b_1) of the query (hook point
                                                                       ``readout.hidden``)
``readout_input``     step, seed, example, dim                         linear read-out only (in place of
                                                                       ``readout_hidden``): the normalised query
                                                                       state the unembedding reads (hook point
                                                                       ``readout.input``)
``readout_rows``      step, seed, class, unit                          rows of the read-out's last linear layer
                                                                       (in the read-out MLP's hidden ``unit``
                                                                       space, not the residual ``dim`` space:
                                                                       the read-out is an MLP, not an
                                                                       unembedding); with a linear read-out the
                                                                       label unembeddings, dims (step, seed,
                                                                       class, dim)
``label``             seed, example                                    the query's label (class coordinate)
``query_class``       seed, example                                    the query item's class
``task``              seed, example                                    the context's task
``query_in_context``  seed, example                                    whether the query's class is in the context
``context_class``     seed, example, pair                              the classes of the context's items, in order
``done``              step                                             written completely (written last)
====================  ===============================================  ===========================================
"""

from training_lab.clamps import ClampSpec
from training_lab.config import PRESETS, LabConfig, ModelConfig, TaskConfig, TrainConfig, preset
from training_lab.errors import LabError, NonFiniteLossError
from training_lab.hooks import HookPoint, Hooks
from training_lab.model import LabTransformer
from training_lab.report import analyse
from training_lab.store import open_run
from training_lab.train import Trainer, train

__all__ = ["PRESETS", "ClampSpec", "HookPoint", "Hooks", "LabConfig", "LabError", "LabTransformer", "ModelConfig",
           "NonFiniteLossError", "TaskConfig", "TrainConfig", "Trainer", "analyse", "open_run", "preset", "train"]
