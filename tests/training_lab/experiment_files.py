"""Experiment files for the experiment and comparison tests."""

#: A tiny [S]-like experiment: three configurations, a named clamp set and a data change, on a tiny model.
TINY = """
description = "tiny"
preset = "singh-quick"
seeds = [0, 1]

[quick]
seeds = [0]

[task]
n_classes = 8
item_dims = 7
[model]
width = 12
n_heads = 2
readout_width = 8
[train]
steps = 6
batch_size = 8
eval_every = 2
evals_per_decade = 2
eval_examples = 32
snapshots_per_decade = 2
snapshot_examples = 16
checkpoint_every = 4

[circuits]
A = [{ point = "attn.pattern", value = "previous_token", blocks = [0] }]
B = [{ point = "attn.pattern", value = "induction", blocks = [1], strength = 1.0 }]

[[configuration]]
name = "free"

[[configuration]]
name = "A+B"
circuits = ["A", "B"]

[[configuration]]
name = "classes-16"
task = { n_classes = 16 }
"""
