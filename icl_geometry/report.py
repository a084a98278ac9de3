"""``report.html``: one self-contained page (figures embedded) that reads a study folder top to bottom.

The page is built only from files of the folder (``study.json``, ``config.toml``, ``tables/*.csv``,
``figures/*.png``), so it can be rebuilt at any time with :func:`write_report` and always matches the tables.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import pandas as pd

from icl_geometry.findings import PAPER_GEMMA_2B, SETTING_NAMES, flow_findings, task_findings

STYLE = """
body { font: 15px/1.5 system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { font-size: 1.8em; margin-bottom: 0.2em; } h2 { border-bottom: 2px solid #ddd; padding-bottom: 0.2em; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.8em 0; } td, th { border: 1px solid #ccc; padding: 0.25em 0.7em; }
th { background: #f3f3f3; text-align: left; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; } .muted { color: #666; font-size: 0.9em; }
ul.findings li { margin: 0.3em 0; } pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
"""


def image_tag(path: Path, alt: str) -> str:
    """The PNG at ``path`` embedded as an ``<img>`` (empty when the file is missing), so the page stands alone."""
    if not path.is_file():
        return ""
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def html_table(frame: pd.DataFrame) -> str:
    """A DataFrame as an HTML table in the report's style: numbers right-aligned to 3 significant digits."""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    rows = []
    for values in frame.itertuples(index=False):
        cells = []
        for value in values:
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            text = "" if numeric and pd.isna(value) else (f"{value:.3g}" if isinstance(value, float) else str(value))
            cells.append(f'<td class="num">{text}</td>' if numeric else f"<td>{html.escape(text)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def html_page(title: str, body: list[str]) -> str:
    """A self-contained page in the report's style from its body's HTML parts."""
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>{''.join(body)}</body></html>")


def _read(folder: Path, name: str) -> pd.DataFrame:
    path = folder / "tables" / name
    return pd.read_csv(path) if path.is_file() else pd.DataFrame()


def _accuracy_table(accuracy: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for row in accuracy.itertuples():
        paper = PAPER_GEMMA_2B.get(row.group)
        rows.append({
            "setting": SETTING_NAMES.get(row.group, row.group), "group": row.group, "k": int(row.shots),
            "accuracy %": 100 * row.accuracy, "label-word accuracy %": 100 * row.label_accuracy,
            "paper, Gemma-2B %": paper if paper is not None else float("nan"),
        })
    return pd.DataFrame(rows)


def _subset(frame: pd.DataFrame, task: str) -> pd.DataFrame:
    return frame[frame.task == task] if "task" in frame else frame


def _task_section(folder: Path, task: str, tables: dict[str, pd.DataFrame]) -> str:
    figures = folder / "figures" / task
    accuracy, measures = _subset(tables["accuracy"], task), _subset(tables["measures"], task)
    transitions, placement = _subset(tables["transitions"], task), _subset(tables["placement"], task)
    findings = task_findings(accuracy, measures, transitions, placement if not placement.empty else None)
    parts = [f"<h2>Task: {html.escape(task)}</h2>", "<h3>Findings</h3><ul class='findings'>"]
    parts += [f"<li>{html.escape(sentence)}</li>" for sentence in findings]
    parts.append("</ul><h3>Accuracy</h3>")
    parts.append(html_table(_accuracy_table(accuracy)))
    parts.append("<p class='muted'>Accuracy is the paper's: the whole-vocabulary argmax of the final logits must be "
                 "the gold label word's token. The paper's Gemma-2B figures (8-shot, [Y] Fig. 7) are shown for "
                 "shape, not as a target: this is a different model and different data.</p>")
    parts.append("<h3>Layer-wise geometry: ICL vs zero-shot vs ablated vs injected</h3>")
    parts.append(image_tag(figures / "curves.png", f"{task} layer-wise measures"))
    parts.append(image_tag(figures / "changes.png", f"{task} measure changes under interventions"))
    parts.append(image_tag(figures / "k_sweep.png", f"{task} k sweep"))
    if not transitions.empty:
        parts.append("<h3>Transition layer</h3>")
        parts.append(html_table(transitions.drop(columns=["task", "method"], errors="ignore")))
        parts.append(f"<p class='muted'>Method: {html.escape(str(transitions.method.iloc[0]))}.</p>")
    parts.append("<h3>Heads</h3>")
    parts.append(image_tag(figures / "head_scores.png", f"{task} head scores"))
    if not placement.empty:
        parts.append(html_table(placement.drop(columns=["task"], errors="ignore")))
    flow = _subset(tables["flow"], task)
    if not flow.empty:
        parts.append("<h3>Information flow between positions (edge knockout)</h3><ul class='findings'>")
        parts += [f"<li>{html.escape(sentence)}</li>" for sentence in flow_findings(flow)]
        parts.append("</ul>")
        parts.append(image_tag(figures / "flow.png", f"{task} edge knockout heat map"))
        parts.append("<p class='muted'>[B] (Bakalova et al., Gemma-2 2B): contextualization edges (y->x) matter in "
                     "lower layers, aggregation edges (y->final) in higher ones. Every cell is in "
                     "<code>tables/flow.csv</code>.</p>")
        parts += _knockout_changes(_subset(tables["changes"], task))
    parts.append(image_tag(figures / "projections.png", f"{task} PCA of query states"))
    return "\n".join(parts)


def _knockout_changes(changes: pd.DataFrame, most: int = 8) -> list[str]:
    """The largest measure changes under the ``[flow]`` knockouts (groups ``knockout_*``), as a table."""
    if changes.empty:
        return []
    knocked = changes[changes["group"].str.startswith("knockout_")]
    if knocked.empty:
        return []
    largest = knocked.reindex(knocked["change"].abs().sort_values(ascending=False).index).head(most)
    return ["<p>Largest measure changes under the knockouts (knockout minus <code>icl</code>, per layer; every "
            "layer and measure in <code>tables/changes.csv</code> and the changes figure above):</p>",
            html_table(largest[["group", "layer", "measure", "value", "baseline_value", "change"]].round(4))]


def write_report(folder: str | Path) -> Path:
    """Build ``report.html`` in a study folder from its tables and figures; return its path."""
    folder = Path(folder)
    meta = json.loads((folder / "study.json").read_text())
    tables = {name: _read(folder, f"{name}.csv") for name in ("accuracy", "measures", "transitions", "placement",
                                                                 "flow", "changes")}
    setup = pd.DataFrame([{"item": key, "value": str(value)} for key, value in meta["setup"].items()])
    body = [
        "<h1>Hidden-state geometry of in-context learning</h1>",
        f"<p class='muted'>Generated by icl-geometry {html.escape(meta.get('version', ''))} in "
        f"{meta.get('seconds', 0) / 60:.1f} min. Every number below is in <code>tables/</code>; every figure in "
        "<code>figures/</code>.</p>",
        "<p>For each task, the query's hidden state is read at every layer. <b>Separability</b> asks whether a "
        "linear classifier can tell the classes apart; <b>alignment</b> asks whether the states point along the "
        "label words' output directions. The paper ([Y] Yang et al., NeurIPS 2025) finds two stages: separability "
        "rises early and plateaus, then alignment rises (the <i>transition</i>); previous-token heads (PTH) build "
        "the first, induction heads (IH) and task vectors the second.</p>",
        "<h2>Setup</h2>", html_table(setup),
    ]
    body += [_task_section(folder, task, tables) for task in meta["tasks"]]
    body.append("<h2>Configuration</h2><pre>" + html.escape((folder / "config.toml").read_text()) + "</pre>")
    path = folder / "report.html"
    path.write_text(html_page("ICL geometry study", body))
    return path
