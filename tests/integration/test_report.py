"""The HTML report and the exports on a real (demo) run: written by the CLI, self-contained, honest about weights."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest

from harmoniad.cli import main
from harmoniad.report import render_report
from harmoniad.store import ResultStore


def _ids(store: ResultStore) -> dict[str, str]:
    runs = store.list_runs(status="complete")
    return dict(zip(runs["method"], runs["id"]))


def test_cli_writes_a_self_contained_report_that_states_random_weights(demo_store: ResultStore, tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    run_id = _ids(demo_store)["harmoniad"]
    assert main(["runs", "--store", str(demo_store.root), "export", run_id, "--format", "html",
                 "--out", str(tmp_path)]) == 0
    path = Path(capsys.readouterr().out.strip())
    assert path == tmp_path / f"{run_id}.html"
    text = path.read_text()
    assert "random weights: not a result" in text
    assert re.search(r'<meta name="harmoniad-weights" content="[^"]*random weights: not a result', text)
    # Self-contained: plotly.js inline once, images inline, nothing fetched from elsewhere.
    assert text.count("<script type=\"text/javascript\">/**\n* plotly.js") <= 1 and "plotly.js" in text
    assert not re.search(r'src="https?://', text)
    for section in ("Runs", "Metrics per category", "Intervals", "Per defect type", "Worst failures"):
        assert f"<h2>{section}</h2>" in text, section
    assert "data:image/png;base64," in text


def test_a_comparison_report_has_paired_tests_and_a_cd_diagram(demo_store: ResultStore) -> None:
    ids = _ids(demo_store)
    text = render_report(demo_store, [ids["harmoniad"], ids["patchcore"], ids["freqfilter"]])
    assert "<h2>Paired tests</h2>" in text and "<h2>Critical-difference diagram</h2>" in text
    # The pixel-space method has no backbone; the others used random weights: each is stated.
    assert "Frequency filter: no backbone weights (pixel-space method)" in text
    assert "HarmoniAD: random weights: not a result" in text


def test_cli_json_and_csv_exports_state_the_weights(demo_store: ResultStore, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    run_id = _ids(demo_store)["patchcore"]
    store = ["runs", "--store", str(demo_store.root), "export", run_id, "--out"]
    assert main([*store, str(tmp_path / "json"), "--format", "json"]) == 0
    record = json.loads((tmp_path / "json" / f"{run_id}.json").read_text())
    assert record["weights_statement"] == "random weights: not a result" and record["results"]
    assert main([*store, str(tmp_path / "csv")]) == 0
    metrics = pd.read_csv(tmp_path / "csv" / f"{run_id}_metrics.csv")
    assert set(metrics["weights"]) == {"random weights: not a result"}
