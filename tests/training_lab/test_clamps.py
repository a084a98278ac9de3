from dataclasses import replace

import numpy as np
import pytest
import torch

from training_lab.clamps import ClampSpec
from training_lab.config import LabConfig
from training_lab.errors import LabError
from training_lab.store import open_run
from training_lab.train import Trainer, train


def _clamped(config, *specs, **task):
    return replace(config, task=replace(config.task, **task), clamps=specs)


def _short(config, steps=10):
    return replace(config, train=replace(config.train, steps=steps))


def test_a_clamped_value_holds_at_every_training_step(tiny, tmp_path):
    config = _short(_clamped(tiny, ClampSpec("attn.pattern", "previous_token", blocks=(0,)),
                             ClampSpec("resid_post", "constant", blocks=(1,), constant=0.5)))
    trainer = Trainer(config, tmp_path / "run")
    seen = []
    # points downstream of the clamps show what the clamped forward used
    with trainer.model.hooks.cache(["blocks.0.attn.v", "blocks.0.attn.z", "readout.input"]) as cache, \
            trainer.model.hooks.add({"readout.input": lambda value, point: seen.append(dict(cache))}):
        trainer.run(progress=False)
    assert len(seen) > config.train.steps
    for values in seen:
        v, z = values["blocks.0.attn.v"], values["blocks.0.attn.z"]
        torch.testing.assert_close(z[:, :, 1:], v[:, :, :-1])
        torch.testing.assert_close(z[:, :, 0], v[:, :, 0])
        assert torch.all(values["readout.input"] == 0.5)


def test_no_gradient_reaches_parameters_that_only_produced_a_clamped_value(tiny, tmp_path):
    config = _short(_clamped(tiny, ClampSpec("attn.pattern", "previous_token", blocks=(0,))))
    trainer = Trainer(config, tmp_path / "run")
    before = {name: w.detach().clone() for name, w in trainer.model.named_weights().items()}
    trainer.run(progress=False)
    after = trainer.model.named_weights()
    for name in ("blocks.0.W_Q", "blocks.0.W_K"):
        assert torch.equal(before[name], after[name]), name
    for name in ("blocks.0.W_V", "blocks.1.W_Q"):
        assert not torch.equal(before[name], after[name]), name


def test_clamped_heads_and_positions_only(tiny, tmp_path):
    config = replace(tiny, model=replace(tiny.model, n_heads=2),
                     clamps=(ClampSpec("attn.z", "zero", blocks=(1,), heads=(1,), positions=(4,)),))
    trainer = Trainer(_short(config, 3), tmp_path / "run")
    seen = []
    with trainer.model.hooks.cache(["blocks.1.attn.head_out"]) as cache, \
            trainer.model.hooks.add({"readout.input": lambda value, point: seen.append(dict(cache))}):
        trainer.run(progress=False)
    out = seen[-1]["blocks.1.attn.head_out"]
    assert torch.all(out[:, :, 4, 1] == 0) and torch.any(out[:, :, 4, 0] != 0) and torch.any(out[:, :, 3, 1] != 0)


def test_an_induction_clamp_writes_the_query_row_with_its_strength(tiny, tmp_path):
    config = _short(_clamped(tiny, ClampSpec("attn.pattern", "induction", blocks=(1,), strength=0.6),
                             n_tasks=1, query_in_context=True), 3)
    trainer = Trainer(config, tmp_path / "run")
    trainer.run(progress=False)
    snaps = open_run(tmp_path / "run", "snapshots").load()
    row = snaps["pattern"].isel(step=-1, block=1, head=0, query=-1).values  # (seed, example, key)
    n, seq = config.train.snapshot_examples, config.task.seq_len
    data = trainer.eval_set
    slot = (data.context_classes[:, :n] == data.query_class[:, :n, None]).float().argmax(-1)
    expected = np.full(row.shape, 0.4 / seq)
    np.put_along_axis(expected, (2 * slot + 1).numpy()[..., None], 0.6 + 0.4 / seq, axis=-1)
    np.testing.assert_allclose(row, expected, rtol=1e-6)


def test_clamping_nothing_changes_nothing(tiny, tmp_path):
    assert LabConfig.from_dict(tiny.to_dict()) == tiny and "clamp" not in tiny.to_dict()
    trainer = Trainer(_short(tiny, 3), tmp_path / "run")
    trainer.run(progress=False, on_step=lambda step: [None for p in trainer.model.hooks.points.values()
                                                      if p.functions and pytest.fail(p.name)])


def test_clamps_on_batched_seeds_equal_separate_runs(tiny, tmp_path):
    config = _short(_clamped(tiny, ClampSpec("attn.pattern", "previous_token", blocks=(0,)),
                             ClampSpec("attn.v", "mean", blocks=(1,))), 12)
    batched = train(config.with_seeds((0, 1)), tmp_path / "batched", progress=False).load()
    for index, seed in enumerate((0, 1)):
        alone = train(config.with_seeds((seed,)), tmp_path / f"seed{seed}", progress=False).load()
        for name in ("loss", "train_loss", "mean_pattern"):
            np.testing.assert_allclose(batched[name].isel(seed=index), alone[name].isel(seed=0), rtol=1e-5,
                                       atol=1e-6, err_msg=f"{name} of seed {seed}")


def test_clamps_round_trip_are_stored_and_resume_refuses_other_clamps(tiny, tmp_path):
    config = _short(_clamped(tiny, ClampSpec("attn.pattern", "previous_token", blocks=(0,), heads=(0,))), 5)
    data = config.to_dict()
    assert data["clamp"] == [{"point": "attn.pattern", "value": "previous_token", "blocks": [0], "heads": [0],
                              "positions": [], "constant": 0.0, "strength": 1.0}]
    assert LabConfig.from_dict(data) == config
    assert train(config, tmp_path / "run", progress=False).attrs["config"] == data
    with pytest.raises(LabError, match=r"another config \(differs in clamp\)"):
        train(_short(tiny, 5), tmp_path / "run", progress=False)


@pytest.mark.parametrize("spec, task, message", [
    ({"point": "attn.nope"}, {}, "unknown hook point 'attn.nope'"),
    ({"point": "attn.pattern", "heads": [3]}, {}, r"heads \[3\] out of range"),
    ({"point": "attn.pattern", "blocks": [2]}, {}, r"blocks \[2\] out of range"),
    ({"point": "resid_post", "heads": [0]}, {}, "no head axis"),
    ({"point": "attn.q", "positions": [9]}, {}, r"positions \[9\] out of range"),
    ({"point": "attn.pattern", "value": "induction", "strength": 1.5}, {}, r"strength must be in \[0, 1\]"),
    ({"point": "attn.pattern", "value": "induction"}, {}, "needs the query's class in the context"),
    ({"point": "attn.v", "value": "previous_token"}, {}, "use it on point 'attn.pattern'"),
    ({"point": "attn.pattern", "value": "max"}, {}, "unknown value 'max'"),
    ({"point": "attn.pattern", "colour": 1}, {}, r"unknown key\(s\) \['colour'\] in \[\[clamp\]\]"),
])
def test_bad_clamps_fail_with_one_line_before_training(tiny, spec, task, message):
    data = tiny.to_dict()
    data["clamp"] = [spec]
    with pytest.raises(LabError, match=message) as error:
        LabConfig.from_dict(data)
    assert "\n" not in str(error.value)


def test_a_clamped_config_round_trips_through_toml_and_the_cli_loader(tiny, tmp_path):
    from icl_geometry.config import dump_toml
    from training_lab.cli import load_lab_config

    config = _clamped(tiny, ClampSpec("attn.pattern", "previous_token", blocks=(0,)),
                      ClampSpec("readout.input", "mean"))
    path = tmp_path / "lab.toml"
    path.write_text(dump_toml(config))
    assert "[[clamp]]" in path.read_text()
    assert load_lab_config(path, tiny) == config


def test_clamps_with_s_model_options_on_batched_seeds_equal_separate_runs(tiny, tmp_path):
    config = replace(tiny,
                     task=replace(tiny.task, n_tasks=1, query_in_context=True),
                     model=replace(tiny.model, width=12, n_heads=2, embed="linear", pre_norm=True, positions="rotary"),
                     train=replace(tiny.train, steps=8, optimizer="adam", lr=1e-3),
                     clamps=(ClampSpec("attn.pattern", "induction", blocks=(1,), heads=(0,), strength=0.5),))
    batched = train(config.with_seeds((0, 1)), tmp_path / "batched", progress=False).load()
    assert np.isfinite(batched["loss"].values).all()
    for index, seed in enumerate((0, 1)):
        alone = train(config.with_seeds((seed,)), tmp_path / f"seed{seed}", progress=False).load()
        np.testing.assert_allclose(batched["loss"].isel(seed=index), alone["loss"].isel(seed=0), rtol=1e-5,
                                   atol=1e-6)
