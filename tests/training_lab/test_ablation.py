"""Per-head ablation at a checkpoint of a tiny run: single and joint, against a hand-made ablation."""

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from icl_geometry.cli import main
from training_lab.ablation import COLUMNS, ablate_heads, default_sets
from training_lab.errors import LabError
from training_lab.train import Trainer, query_losses, train


@pytest.fixture
def run(tiny, tmp_path):
    config = replace(tiny, model=replace(tiny.model, n_heads=2),
                     train=replace(tiny.train, seeds=(0, 1), keep_checkpoints=True))
    train(config, tmp_path / "run", progress=False)
    return config, tmp_path / "run"


def test_every_checkpoint_is_kept_when_asked(run):
    config, out = run
    assert sorted(p.name for p in (out / "checkpoints").glob("*.safetensors")) == [
        f"step_{s:08d}.safetensors" for s in (10, 20, 30)]


def test_single_and_joint_head_ablation_at_a_checkpoint(run):
    config, out = run
    table = ablate_heads(out, step=20)
    assert list(table.columns) == COLUMNS
    assert set(table["step"]) == {20} and set(table["seed"]) == {0, 1} and set(table["evaluation"]) == {"train"}
    per_seed = table[(table["seed"] == 1)]
    assert list(per_seed["ablated"]) == ["none", "0.0", "0.1", "1.0", "1.1", "0.0+0.1", "1.0+1.1"]
    assert list(per_seed["kind"]) == ["none"] + ["single"] * 4 + ["joint"] * 2
    # by hand: the weights at step 20, block 1's head 0 output zeroed, seed 1's loss
    trainer = Trainer(config, out)
    from training_lab import checkpoints
    checkpoints.restore_weights(trainer.model.named_weights(), checkpoints.load(out / "checkpoints" /
                                                                                "step_00000020.safetensors"))
    mask = torch.tensor([True, False]).view(1, 1, 1, 2, 1)
    with torch.no_grad(), trainer.model.hooks.ablate("blocks.1.attn.head_out", mask):
        loss = query_losses(trainer.model(trainer.eval_set.tokens), trainer.eval_set.label)[1].item()
    row = per_seed[per_seed["ablated"] == "1.0"].iloc[0]
    assert row["loss"] == pytest.approx(loss, rel=1e-5)
    intact = per_seed[per_seed["kind"] == "none"].iloc[0]
    assert row["delta_loss"] == pytest.approx(loss - intact["loss"], rel=1e-5, abs=1e-7)
    joint = per_seed[per_seed["ablated"] == "1.0+1.1"].iloc[0]
    singles = per_seed[per_seed["ablated"].isin(["1.0", "1.1"])]["delta_loss"].sum()
    assert joint["sum_single_delta"] == pytest.approx(singles)
    assert np.isnan(per_seed[per_seed["kind"] != "joint"]["sum_single_delta"]).all()


def test_chosen_sets_mean_ablation_and_bad_requests(run):
    config, out = run
    table = ablate_heads(out, sets=[[(0, 1), (1, 0)]], ablation="mean")
    assert set(table["step"]) == {30} and list(table["ablated"])[-1] == "0.1+1.0"
    with pytest.raises(LabError, match="no checkpoint at step 15; saved steps: 10, 20, 30"):
        ablate_heads(out, step=15)
    with pytest.raises(LabError, match="distinct heads"):
        ablate_heads(out, sets=[[(0, 2)]])
    with pytest.raises(LabError, match="ablation must be one of zero, mean"):
        ablate_heads(out, ablation="noise")
    assert default_sets(2, 2)[-1] == ((1, 0), (1, 1))


def test_the_cli_ablates_heads_of_a_run_and_writes_a_table(run, capsys):
    config, out = run
    assert main(["train", "--out", str(out), "--ablate-heads", "--at-step", "10", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    table = pd.read_csv(out / "tables" / "head_ablation_step_10.csv")
    assert list(table.columns) == COLUMNS and set(table["step"]) == {10}
    assert "largest single-head effects" in printed and "head_ablation_step_10.csv" in printed
    assert main(["train", "--out", str(out), "--ablate-heads", "--at-step", "11"]) == 2
    assert "no checkpoint at step 11" in capsys.readouterr().err
