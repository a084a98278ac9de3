"""[S]'s computed clamp values (preserve, previous-token input, perfect copy), its sub-circuits A, B, C, and the
clamps' guarantees on the trainer (bitwise no-op, batched seeds)."""

from contextlib import nullcontext
from dataclasses import replace

import numpy as np
import pytest
import torch

from training_lab.clamps import ABSENT_LOGIT, ClampSpec, applied, shifted_to_previous
from training_lab.config import LabConfig
from training_lab.errors import LabError
from training_lab.train import Trainer, query_losses, train


@pytest.fixture
def s_tiny(tiny):
    """[S]'s task and model options at a tiny size: relabelled contexts, 2 heads, pre-norm, rotary, Adam."""
    return replace(tiny, task=replace(tiny.task, n_tasks=1, query_in_context=True, relabel=True),
                   model=replace(tiny.model, width=12, n_heads=2, embed="linear", pre_norm=True, positions="rotary"),
                   train=replace(tiny.train, steps=6, optimizer="adam", lr=1e-2))


def _with(config, *specs, steps=None):
    config = replace(config, clamps=specs)
    return config if steps is None else replace(config, train=replace(config.train, steps=steps))


def _gradients(model, batch, specs, task):
    model.zero_grad(set_to_none=True)
    with applied(model, specs, batch, task):
        logits = model(batch.tokens)
    query_losses(logits, batch.label).sum().backward()
    return logits.detach(), {name: w.grad.clone() for name, w in model.named_weights().items()}


def test_preserve_alone_changes_neither_the_forward_bitwise_nor_the_gradient(s_tiny, tmp_path):
    trainer = Trainer(s_tiny, tmp_path / "run")
    batch = trainer.next_batch()
    free_logits, free = _gradients(trainer.model, batch, (), s_tiny.task)
    specs = (ClampSpec("attn.pattern", "preserve"), ClampSpec("attn.v", "preserve", blocks=(1,), heads=(0,)))
    logits, preserved = _gradients(trainer.model, batch, specs, s_tiny.task)
    assert torch.equal(logits, free_logits)
    # the preserved entries pass the gradient through the extra pass: every block's W_Q still learns
    for name, grad in free.items():
        torch.testing.assert_close(preserved[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    assert preserved["blocks.0.W_Q"].abs().sum() > 0


def test_preserve_keeps_the_intact_pattern_under_a_value_ablation_at_every_step(s_tiny, tmp_path):
    config = _with(s_tiny, ClampSpec("attn.v", "zero", blocks=(0,)), ClampSpec("attn.pattern", "preserve", blocks=(1,)))
    trainer = Trainer(config, tmp_path / "run")
    calls = []
    names = ["blocks.0.attn.head_out", "blocks.1.attn.pattern", "blocks.1.attn.v", "blocks.1.attn.z"]
    with trainer.model.hooks.cache(names) as cache, \
            trainer.model.hooks.add({"logits": lambda value, point: calls.append(dict(cache))}):
        trainer.run(progress=False)
    evaluations = len(trainer.schedule.evals)
    assert len(calls) == 2 * (config.train.steps + evaluations)  # an extra pass before every clamped one
    for intact, clamped in zip(calls[0::2], calls[1::2]):
        assert torch.all(clamped["blocks.0.attn.head_out"] == 0) and intact["blocks.0.attn.head_out"].abs().sum() > 0
        # the clamped pass mixed its own values with the intact pass's pattern (the hook on the pattern point
        # sees the value before the clamp, so the clamp's effect shows in z)
        expected = torch.einsum("rbhqk,rbkhe->rbqhe", intact["blocks.1.attn.pattern"], clamped["blocks.1.attn.v"])
        torch.testing.assert_close(clamped["blocks.1.attn.z"], expected)
        assert not torch.allclose(clamped["blocks.1.attn.pattern"], intact["blocks.1.attn.pattern"])


def test_a_perfect_copy_writes_the_heads_label_scores_as_logits(s_tiny, tmp_path):
    spec = ClampSpec("logits", "perfect_copy", blocks=(1,), heads=(1,))
    trainer = Trainer(s_tiny, tmp_path / "run")
    batch = trainer.next_batch()
    with trainer.model.hooks.cache(["blocks.1.attn.scores"]) as free:
        trainer.model(batch.tokens)
    with applied(trainer.model, (spec,), batch, s_tiny.task):
        logits = trainer.model(batch.tokens)
    label_tokens = batch.tokens[0, :, 1::2, :s_tiny.task.item_dims]  # the context's labels, as the model sees them
    torch.testing.assert_close(label_tokens, trainer.worlds[0].label_vectors[batch.context_labels[0]])
    scores = free["blocks.1.attn.scores"][:, :, 1, -1]  # (R, B, S) the query's row of head 1
    expected = torch.full(logits.shape, ABSENT_LOGIT + np.log(s_tiny.task.n_pairs))
    for pair in range(s_tiny.task.n_pairs):
        expected.scatter_(-1, batch.context_labels[..., pair:pair + 1], scores[..., 2 * pair + 1:2 * pair + 2])
    torch.testing.assert_close(logits, expected)


def test_a_perfect_copy_trains_the_heads_match_but_nothing_that_only_fed_the_read_out(s_tiny, tmp_path):
    config = _with(s_tiny, ClampSpec("logits", "perfect_copy", blocks=(1,), heads=(1,)))
    trainer = Trainer(config, tmp_path / "run")
    before = {name: w.detach().clone() for name, w in trainer.model.named_weights().items()}
    curves = trainer.run(progress=False).load()
    assert np.isfinite(curves["loss"].values).all()
    after = trainer.model.named_weights()
    only_fed_the_read_out = [n for n in before if n.startswith("readout.") or n in ("blocks.1.W_V", "blocks.1.W_O")]
    assert "readout.W_1" in only_fed_the_read_out or "readout.W_U" in only_fed_the_read_out
    for name in only_fed_the_read_out:
        assert torch.equal(before[name], after[name]), name
    for name in ("blocks.1.W_Q", "blocks.1.W_K", "blocks.0.W_V", "W_E"):
        assert not torch.equal(before[name], after[name]), name


def test_circuit_a_idealises_the_previous_blocks_output(s_tiny, tmp_path):
    trainer = Trainer(s_tiny, tmp_path / "run")
    model, batch = trainer.model, trainer.next_batch()
    points = ["embed", "blocks.0.resid_post", "blocks.1.attn.pattern", "blocks.1.attn.v"]
    with model.hooks.cache(["embed"]) as embed, \
            model.hooks.clamp("blocks.0.resid_post", lambda _: shifted_to_previous(embed["embed"])), \
            model.hooks.cache(["blocks.1.attn.pattern"]) as shifted:
        model(batch.tokens)
    with model.hooks.ablate("blocks.0.attn.head_out"), model.hooks.cache(["blocks.1.attn.v"]) as own:
        model(batch.tokens)
    with applied(model, (ClampSpec(circuit="A"),), batch, s_tiny.task), model.hooks.cache(points) as seen:
        model(batch.tokens)
    # block 1 attends as if block 0 had copied each previous token exactly, and reads each token's own values
    torch.testing.assert_close(seen["blocks.0.resid_post"], seen["embed"])
    torch.testing.assert_close(seen["blocks.1.attn.pattern"], shifted["blocks.1.attn.pattern"])
    torch.testing.assert_close(seen["blocks.1.attn.v"], own["blocks.1.attn.v"])
    tokens = torch.arange(s_tiny.task.seq_len, dtype=torch.float).view(1, 1, -1, 1)
    assert shifted_to_previous(tokens).flatten().tolist() == [0, 0, 1, 2, 4]


def test_circuit_a_leaves_the_previous_block_untrained_and_trains_the_match(s_tiny, tmp_path):
    config = _with(s_tiny, ClampSpec(circuit="A"))
    trainer = Trainer(config, tmp_path / "run")
    before = {name: w.detach().clone() for name, w in trainer.model.named_weights().items()}
    trainer.run(progress=False)
    after = trainer.model.named_weights()
    for name in ("blocks.0.W_Q", "blocks.0.W_K", "blocks.0.W_V", "blocks.0.W_O", "blocks.0.g_norm"):
        assert torch.equal(before[name], after[name]), name
    for name in ("blocks.1.W_Q", "blocks.1.W_K", "blocks.1.W_V", "W_E"):
        assert not torch.equal(before[name], after[name]), name


def test_circuits_expand_round_trip_and_are_stored(s_tiny, tmp_path):
    data = s_tiny.to_dict()
    data["clamp"] = [{"circuit": "A"}, {"circuit": "B", "heads": [0], "strength": 0.8},
                     {"circuit": "C", "blocks": [1], "heads": [1]}]
    config = LabConfig.from_dict(data)
    assert LabConfig.from_dict(config.to_dict()) == config
    assert config.to_dict()["clamp"][1] == {"circuit": "B", "blocks": [], "heads": [0], "strength": 0.8}
    expanded = [part for spec in config.clamps for part in spec.expand(config.model)]
    assert expanded == [ClampSpec("attn.head_out", "zero", blocks=(0,)),
                        ClampSpec("attn.scores", "previous_token_input", blocks=(1,)),
                        ClampSpec("attn.pattern", "induction", blocks=(1,), heads=(0,), strength=0.8),
                        ClampSpec("logits", "perfect_copy", blocks=(1,), heads=(1,))]
    curves = train(_with(config, *config.clamps, steps=3), tmp_path / "run", progress=False)
    assert curves.attrs["config"]["clamp"] == config.to_dict()["clamp"]  # the circuits as written, not expanded
    assert np.isfinite(curves["loss"].values).all()


def test_head_value_and_output_ablations_use_the_existing_points(s_tiny, tmp_path):
    trainer = Trainer(s_tiny, tmp_path / "run")
    batch = trainer.next_batch()
    specs = (ClampSpec("attn.v", "zero", blocks=(1,), heads=(0,)), ClampSpec("attn.head_out", "mean", blocks=(0,),
                                                                             heads=(1,)))
    with trainer.model.hooks.cache(["blocks.0.attn.head_out"]) as free:
        trainer.model(batch.tokens)
    with applied(trainer.model, specs, batch, s_tiny.task), \
            trainer.model.hooks.cache(["blocks.1.attn.head_out", "blocks.0.attn.head_out"]) as seen:
        trainer.model(batch.tokens)
    assert torch.all(seen["blocks.1.attn.head_out"][:, :, :, 0] == 0)
    assert seen["blocks.1.attn.head_out"][:, :, :, 1].abs().sum() > 0
    out = seen["blocks.0.attn.head_out"][:, :, :, 1]  # (R, B, S, d): head 1's output, its batch mean everywhere
    torch.testing.assert_close(out, free["blocks.0.attn.head_out"][:, :, :, 1].mean(dim=1, keepdim=True).expand_as(out))


def test_clamping_nothing_is_bitwise_the_unhooked_run(s_tiny, tmp_path, monkeypatch):
    config = replace(s_tiny, train=replace(s_tiny.train, seeds=(0, 1)))
    hooked = train(config, tmp_path / "hooked", progress=False).load()
    monkeypatch.setattr("training_lab.clamps.applied", lambda *args: nullcontext())  # no clamp code at all
    plain = train(config, tmp_path / "plain", progress=False).load()
    for name in ("loss", "train_loss", "accuracy", "mean_pattern"):
        np.testing.assert_array_equal(hooked[name].values, plain[name].values, err_msg=name)


@pytest.mark.parametrize("specs", [
    (ClampSpec("attn.v", "zero", blocks=(0,), heads=(1,)), ClampSpec("attn.pattern", "preserve", blocks=(1,))),
    (ClampSpec(circuit="A"), ClampSpec(circuit="C", heads=(0,))),
    (ClampSpec(circuit="A"), ClampSpec(circuit="B", heads=(1,), strength=0.7)),
], ids=["preserve", "A+C", "A+B"])
def test_computed_clamps_on_batched_seeds_equal_separate_runs(s_tiny, tmp_path, specs):
    config = _with(s_tiny, *specs, steps=5)
    batched = train(config.with_seeds((0, 1)), tmp_path / "batched", progress=False).load()
    assert np.isfinite(batched["loss"].values).all()
    for index, seed in enumerate((0, 1)):
        alone = train(config.with_seeds((seed,)), tmp_path / f"seed{seed}", progress=False).load()
        for name in ("loss", "train_loss", "mean_pattern"):
            np.testing.assert_allclose(batched[name].isel(seed=index), alone[name].isel(seed=0), rtol=1e-5,
                                       atol=1e-6, err_msg=f"{name} of seed {seed}")


@pytest.mark.parametrize("spec, message", [
    ({}, "needs a point"),
    ({"circuit": "D"}, "unknown clamp circuit 'D'; valid circuits: A"),
    ({"circuit": "A", "point": "attn.v"}, "takes blocks, heads and strength only"),
    ({"circuit": "A", "strength": 0.5}, "strength applies to circuit B"),
    ({"circuit": "B", "strength": 1.5}, r"strength must be in \[0, 1\]"),
    ({"circuit": "B", "heads": [5]}, r"heads \[5\] out of range"),
    ({"circuit": "B", "blocks": [2]}, r"one block .* below 2, got \[2\]"),
    ({"circuit": "A", "blocks": [0]}, "must be >= 1"),
    ({"circuit": "A", "heads": [0]}, "leave its heads empty"),
    ({"circuit": "C"}, r"give heads = \[h\], got \[\]"),
    ({"point": "logits", "value": "perfect_copy", "blocks": [1]}, "reads one head's scores"),
    ({"point": "logits", "value": "perfect_copy", "blocks": [1], "heads": [7]}, "out of range"),
    ({"point": "logits", "value": "perfect_copy", "blocks": [1], "heads": [0], "positions": [4]},
     "leave its positions empty"),
    ({"point": "attn.pattern", "value": "perfect_copy"}, "use it on point 'logits'"),
    ({"point": "attn.pattern", "value": "previous_token_input"}, "use it on point 'attn.scores'"),
    ({"point": "attn.scores", "value": "previous_token_input"}, "give blocks >= 1"),
    ({"point": "attn.scores", "value": "previous_token_input", "blocks": [0, 1]}, "give blocks >= 1"),
    ({"point": "attn.v", "value": "preserve", "heads": [9]}, r"heads \[9\] out of range"),
    ({"point": "attn.nope", "value": "preserve"}, "unknown hook point 'attn.nope'"),
])
def test_bad_computed_clamps_and_circuits_fail_with_one_line_before_training(s_tiny, spec, message):
    data = s_tiny.to_dict()
    data["clamp"] = [spec]
    with pytest.raises(LabError, match=message) as error:
        LabConfig.from_dict(data)
    assert "\n" not in str(error.value)


def test_a_perfect_copy_needs_the_query_in_the_context(tiny):
    data = tiny.to_dict()
    data["clamp"] = [{"circuit": "C", "heads": [0]}]
    with pytest.raises(LabError, match="needs the query's class in the context"):
        LabConfig.from_dict(data)
