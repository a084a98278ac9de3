"""The linear read-out ([S]'s unembedding): its hook points, logits, run store variables and geometry."""

from dataclasses import replace

import numpy as np
import pytest
import torch
import xarray as xr
from safetensors.torch import load_file

from training_lab.clamps import ClampSpec
from training_lab.config import LabConfig, ModelConfig, preset
from training_lab.errors import LabError
from training_lab.geometry_over_training import geometry_over_training, run_geometry
from training_lab.model import LabTransformer
from training_lab.store import open_run
from training_lab.tasks import make_world, sample, stack
from training_lab.train import train


@pytest.fixture
def linear(tiny) -> LabConfig:
    return replace(tiny, model=replace(tiny.model, readout="linear", pre_norm=True))


def test_the_linear_readout_is_one_matrix_on_the_readout_input_and_every_point_fires_once(linear):
    model = LabTransformer(linear.model, linear.task, (0, 1))
    world = make_world(linear.task, torch.Generator().manual_seed(0))
    batch = stack([sample(linear.task, world, 6, torch.Generator().manual_seed(1))] * 2)
    expected = ["embed"] + [f"blocks.{b}.{p}" for b in range(2) for p in
                            ("attn.q", "attn.k", "attn.v", "attn.scores", "attn.pattern", "attn.z", "attn.head_out",
                             "resid_post")] + ["readout.input", "logits"]
    assert model.hooks.names == expected
    assert [n for n in model.weight_names if n.startswith("readout.W")] == ["readout.W_U"]
    assert model.weight("readout.W_U").shape == (2, linear.model.width, linear.task.n_labels)
    calls: list[str] = []
    with model.hooks.add([(name, lambda value, point: calls.append(point.name)) for name in expected]), \
            model.hooks.cache() as cache:
        logits = model(batch.tokens)
    assert calls == expected
    torch.testing.assert_close(logits, torch.bmm(cache["readout.input"], model.weight("readout.W_U")))
    assert model.readout_site == "readout.input"
    assert torch.equal(model.readout_rows(), model.weight("readout.W_U").transpose(1, 2))


def test_readout_kinds_are_validated_and_a_linear_model_has_no_hidden_readout_point(linear):
    with pytest.raises(LabError, match="model.readout must be one of mlp, linear"):
        ModelConfig(readout="unembed")
    with pytest.raises(LabError, match="a linear read-out has no such point"):
        replace(linear, clamps=(ClampSpec("readout.hidden"),))


def test_the_singh_presets_use_the_linear_readout():
    assert preset("singh").model.readout == preset("singh-quick").model.readout == "linear"
    assert preset("quick").model.readout == preset("paper").model.readout == "mlp"


def test_a_linear_run_stores_the_readout_input_and_the_label_unembeddings(linear, tmp_path):
    train(linear, tmp_path / "run", progress=False)
    snaps = open_run(tmp_path / "run", "snapshots").load()
    assert "readout_hidden" not in snaps
    assert snaps["readout_input"].dims == ("step", "seed", "example", "dim")
    assert snaps["readout_rows"].dims == ("step", "seed", "class", "dim")
    weights = load_file(str(next((tmp_path / "run" / "checkpoints").glob("*.safetensors"))))
    np.testing.assert_array_equal(weights["readout.W_U"].transpose(1, 2).numpy(), snaps["readout_rows"][-1].values)
    final = torch.from_numpy(snaps["hidden"].isel(step=-1, layer=-1).values)
    normed = torch.nn.functional.layer_norm(final, final.shape[-1:]) * weights["readout.g_norm"][:, None] \
        + weights["readout.b_norm"][:, None]
    np.testing.assert_allclose(snaps["readout_input"].isel(step=-1).values, normed.numpy(), rtol=1e-5, atol=1e-5)


def test_linear_alignment_is_measured_at_every_residual_layer():
    rng = np.random.default_rng(0)
    classes, per_class, dim = 4, 16, 8
    labels = np.repeat(np.arange(classes), per_class)
    H = rng.normal(size=(2, 1, 3, len(labels), dim))
    H[1, :, 2] += 5 * np.eye(classes, dim)[labels]  # layer 2 leans towards its label's row at the second step
    rows = xr.DataArray(np.tile(np.eye(classes, dim), (2, 1, 1, 1)), dims=("step", "seed", "class", "dim"))
    inner = xr.DataArray(H[:, :, 2], dims=("step", "seed", "example", "dim"))
    result = geometry_over_training(H, labels, readout_rows=rows, readout_hidden_states=inner, steps=[0, 10],
                                    measures=("mean_alignment",), n_boot=0, readout="linear")
    assert list(result["site"].values) == ["embedding", "after block 0", "after block 1", "readout input"]
    mean = result["value"].sel(measure="mean_alignment")
    assert np.isfinite(mean).all()
    assert float(mean.sel(layer=2, step=10).min()) > 3 and float(mean.sel(layer=3, step=10).min()) > 3
    assert float(abs(mean.sel(step=0)).max()) < 1 and float(abs(mean.sel(layer=1)).max()) < 1
    assert "unembeddings" in result.attrs["alignment_to"]


def test_run_geometry_of_a_linear_run_aligns_every_layer_to_the_label_unembeddings(linear, tmp_path):
    config = replace(linear, train=replace(linear.train, snapshot_examples=32))
    train(config, tmp_path / "run", progress=False)
    result = run_geometry(open_run(tmp_path / "run", "snapshots"), measures=("separability", "mean_alignment"),
                          n_boot=0)
    assert list(result["site"].values)[-1] == "readout input"
    assert np.isfinite(result["value"].sel(measure="mean_alignment")).all()


def test_a_run_stored_before_model_readout_existed_still_resumes(tiny, tmp_path):
    from extraction.store import consolidate, open_root

    config = replace(tiny, train=replace(tiny.train, steps=5))
    train(config, tmp_path / "run", progress=False)
    store = tmp_path / "run" / "run.zarr"
    old = config.to_dict()
    del old["model"]["readout"]
    open_root(store, mode="a").attrs["config"] = old
    consolidate(store)
    train(config, tmp_path / "run", progress=False)  # no "another config" refusal
