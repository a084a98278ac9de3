"""The quick preset end to end through the CLI: it must show a plateau and a rise, detected as phases."""

import pandas as pd
import pytest

from icl_geometry.cli import main


@pytest.mark.slow
def test_quick_preset_trains_and_reports_at_least_two_phases(tmp_path):
    out = tmp_path / "lab-quick"
    assert main(["train", "--preset", "quick", "--out", str(out), "--no-progress"]) == 0
    phases = pd.read_csv(out / "tables" / "phases.csv").dropna(subset=["accuracy"])
    assert len(phases) >= 2, phases
    assert phases["accuracy"].iloc[0] < 0.4 and phases["accuracy"].iloc[-1] > 0.6, phases  # a plateau, then a rise
    assert (out / "report.html").is_file()
    for name in ("training_curves", "circuit_metrics", "attention_maps", "measures_over_training"):
        assert (out / "figures" / f"{name}.png").is_file()
