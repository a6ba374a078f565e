"""`agg2exp demo` end to end on a small cohort: phantoms, Ray run, store, anomalies, audit, report."""

from __future__ import annotations

import re

import pytest

from engine import store
from engine.cli import main as cli_main

pytestmark = pytest.mark.slow


def test_demo_runs_the_whole_pipeline(tmp_path, capsys):
    db = tmp_path / "demo.duckdb"
    code = cli_main(["demo", "--patients", "6", "--db", str(db), "--out", str(tmp_path / "out"), "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert re.search(r"run demo-\S+: 6 patients done, 0 failed", out)
    assert "most anomalous patients" in out and "bias audit" in out
    report = re.search(r"report: (\S+\.html)", out)
    assert report and (tmp_path / "out" / "report").exists()
    with store.open(db) as s:
        run_id = s.latest_run()
        counts = s.table_counts(run_id)
        assert counts["patients"] == 6 and counts["predictions"] == 6 * 17
        # every patient: 17 targets x (17 predicted RoIs + joined lung) x 2 stats x 3 signs at most
        per_patient = s.frame("SELECT patient_id, count(*) AS n FROM importances WHERE run_id = ? GROUP BY ALL", [run_id])
        assert per_patient.height == 6 and per_patient["n"].min() > 17 * 6
        assert set(s.frame("SELECT DISTINCT roi FROM importances WHERE run_id = ?", [run_id])["roi"]) >= {"lung", "aorta"}
        assert s.anomaly_scores(run_id).height == 6 * 18  # 17 classes + the mean
        assert s.audits(run_id).height > 0
        info = s.run_info(run_id)
        assert info["config"]["attribution"]["method"] == "smoothgrad"
        assert info["report"]["counts"]["done"] == 6
