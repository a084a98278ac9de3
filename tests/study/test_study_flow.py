"""The study's optional ``[flow]`` section (issue 10, item 7): the edge scan per task, its table, heat map and
report section; off by default."""

from __future__ import annotations

import pandas as pd
import pytest

from icl_geometry.config import ConfigError, FlowSection, StudyConfig, config_from_dict
from icl_geometry.findings import flow_findings
from icl_geometry.study import Study

from .test_study import tiny_config


def test_flow_is_off_by_default_and_checks_its_edges(tmp_path):
    assert not StudyConfig().flow.enabled
    assert not [s for s in Study(StudyConfig(), tmp_path, progress=False).stages() if s.name.endswith("flow")]
    with pytest.raises(ConfigError, match="flow.edges"):
        config_from_dict({"flow": {"edges": ["y->nowhere"]}})


def test_enabled_flow_writes_table_heat_map_and_report(tiny_gemma_dir, tmp_path):
    config = tiny_config(tiny_gemma_dir)
    config.heads.enabled = False
    config.data.shots = [2]
    config.flow = FlowSection(enabled=True, shots=2, n=4, width=2, edges=["y->x", "y->final"])
    Study(config, tmp_path, progress=False).run()
    flow = pd.read_csv(tmp_path / "tables" / "flow.csv")
    assert set(flow["edge"]) == {"y->x", "y->final"} and (flow["task"] == "sentiment").all()
    assert (tmp_path / "figures" / "sentiment" / "flow.png").is_file()
    report = (tmp_path / "report.html").read_text()
    assert "Information flow between positions" in report and "most harmful first" in report


def test_flow_findings_rank_edges_per_half():
    rows = []
    for window in range(4):  # 5 blocks, width 2: windows 0-1 .. 3-4; lower half starts below block 3
        for edge, lower, upper in (("y->x", -0.5, 0.0), ("y->final", 0.0, -0.4)):
            value = lower if window < 3 else upper
            rows += [dict(edge=edge, window=window, window_last=window + 1, quantity=q, value=value, low=0, high=0)
                     for q in ("accuracy_change", "logit_change")]
    lower, upper = flow_findings(pd.DataFrame(rows))
    assert "lower blocks (0-3)" in lower and lower.index("y->x -0.50") < lower.index("y->final")
    assert "upper blocks (3-4)" in upper and upper.index("y->final -0.40") < upper.index("y->x")


def test_flow_knockouts_are_extracted_measured_and_reported_as_changes(tiny_gemma_dir, tmp_path):
    config = tiny_config(tiny_gemma_dir)
    config.heads.enabled = False
    config.data.shots = [2]
    config.flow = FlowSection(enabled=True, shots=2, n=4, width=2, edges=["y->final"], knockouts=["y->final@1"])
    Study(config, tmp_path, progress=False).run()
    changes = pd.read_csv(tmp_path / "tables" / "changes.csv")
    assert set(changes["group"]) == {"knockout_y-final_1-2"} and set(changes["baseline"]) == {"icl"}
    assert {"separability", "variance_alignment"} <= set(changes["measure"])
    assert (tmp_path / "figures" / "sentiment" / "changes.png").is_file()
    assert "knockout_y-final_1-2" in set(pd.read_csv(tmp_path / "tables" / "accuracy.csv")["group"])
    assert "Largest measure changes under the knockouts" in (tmp_path / "report.html").read_text()


@pytest.mark.parametrize("cells, message", [(["y->final"], "EDGE@FIRST"), (["y->up@1"], "unknown edge"),
                                            (["y->x@-1"], "first block")])
def test_bad_flow_knockouts_are_refused_in_one_line(cells, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"flow": {"enabled": True, "knockouts": cells}})
