import json

import pandas as pd
import pytest

from extraction.store import open_group
from icl_geometry.cli import main

STEPS = ("score", "ablate", "inject", "sweep", "study")


def last_json(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("step", STEPS)
def test_every_step_has_a_teaching_help(step, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["heads", step, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "examples:" in text and f"icl-geometry heads {step}" in text and "--model" in text


def test_heads_without_a_step_prints_help(capsys):
    assert main(["heads"]) == 2
    text = capsys.readouterr().out
    assert all(step in text for step in STEPS)


def test_score_ablate_inject(tiny_gemma_dir, tmp_path, capsys):
    store = str(tmp_path / "s.zarr")
    model = ["--model", str(tiny_gemma_dir)]
    assert main(["heads", "score", store, *model, "--shots", "2", "--n", "6", "--top", "3"]) == 0
    scores = last_json(capsys)
    assert set(scores["top"]) == {"pth", "ih", "previous_token", "induction", "duplicate_token"}
    assert len(scores["top"]["ih"]) == 3
    # named sets re-use the saved scores (same shots, --n-score = the score run's n)
    assert main(["heads", "ablate", store, *model, "--set", "ih", "--shots", "2", "--n", "5", "--n-score", "6"]) == 0
    ablated = last_json(capsys)
    assert ablated["group"] == "ablate_ih" and [list(h) for h in ablated["heads"]] == scores_top_ih(store)
    assert main(["heads", "ablate", store, *model, "--set", "1.2,3.0", "--mode", "mean", "--shots", "2", "--n", "5",
                 "--n-score", "4", "--setting", "mine"]) == 0
    [record] = open_group(store, "mine").attrs["intervention"]
    assert record["heads"] == [[1, 2], [3, 0]] and record["mode"] == "mean" and record["origin"] == {"set": "custom"}
    capsys.readouterr()
    assert main(["heads", "inject", store, *model, "--vector", "pth", "--shots", "2", "--n", "5",
                 "--n-score", "6"]) == 0
    injected = last_json(capsys)
    assert injected["group"] == "inject_pth" and injected["layer"] == 2
    assert open_group(store, "inject_pth").attrs["shots"] == 0


def scores_top_ih(store):
    from heads.scores import load_scores
    from heads.selection import top_heads

    return [list(h) for h in top_heads(load_scores(store), "ih", fraction=0.1)]


def test_sweep_writes_a_csv(tiny_gemma_dir, tmp_path, capsys):
    out = tmp_path / "sweep.csv"
    assert main(["heads", "sweep", "--model", str(tiny_gemma_dir), "--shots", "2", "--n", "4", "--out", str(out)]) == 0
    printed = last_json(capsys)
    table = pd.read_csv(out)
    assert len(table) == 16 and {"block", "head", "logit_diff", "accuracy"} <= set(table.columns)
    assert "layer" not in table.columns  # head data are indexed by block; layer means a stored state
    assert len(printed["most_harmful"]) == 5 and "block" in printed["most_harmful"][0]


def test_score_without_the_first_pth_pair(tiny_gemma_dir, tmp_path, capsys):
    from heads.scores import load_scores

    store = str(tmp_path / "s.zarr")
    assert main(["heads", "score", store, "--model", str(tiny_gemma_dir), "--shots", "1", "--n", "3",
                 "--no-pth-first-pair"]) == 0
    saved = load_scores(store)
    assert saved.attrs["config"]["pth_first_pair"] is False and saved["pth"].dims == ("block", "head")
    capsys.readouterr()
    assert main(["heads", "score", store, "--model", str(tiny_gemma_dir), "--shots", "1", "--n", "3"]) == 2
    assert "another configuration" in capsys.readouterr().err


def test_study_command(tiny_gemma_dir, tmp_path, capsys):
    store, figures = tmp_path / "s.zarr", tmp_path / "figures"
    assert main(["heads", "study", str(store), "--model", str(tiny_gemma_dir), "--shots", "2", "--n", "6",
                 "--n-score", "4", "--no-measures", "--quiet", "--figures", str(figures)]) == 0
    summary = last_json(capsys)
    assert [row["setting"] for row in summary["accuracy"]][:3] == ["normal", "without PTH", "without IH"]
    assert (figures / "accuracy.csv").is_file() and (figures / "head_scores.png").is_file()


def test_user_mistakes_are_one_line_errors(tiny_gemma_dir, tmp_path, capsys):
    code = main(["heads", "ablate", str(tmp_path / "s.zarr"), "--model", str(tiny_gemma_dir), "--set", "9.9"])
    assert code == 2
    err = capsys.readouterr().err
    assert "block 9 is out of range" in err and "Traceback" not in err
