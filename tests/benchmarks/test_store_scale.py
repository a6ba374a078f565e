"""The store-scale benchmark at a small size: it runs end to end and reports every figure it promises."""

from __future__ import annotations

from pathlib import Path

from tests.benchmarks.script import run_benchmark


KEYS = ("bytes_per_row", "write_patients_per_s_first10", "write_patients_per_s_last10", "read_latency_p95_s",
        "read_staleness_max_s", "anomaly_s", "audit_s", "graph_s", "report_s", "peak_rss_gb")


def test_store_scale_benchmark_reports_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "scale.json"
    proc, fig = run_benchmark("store_scale.py", "--patients", "40", "--read-interval", "0.2", "--n-boot", "20",
                              "--db", str(tmp_path / "scale.duckdb"), out=out)
    for key in KEYS:
        assert isinstance(fig[key], (int, float)) and fig[key] > 0, (key, fig[key])
    assert fig["importance_rows"] == 40 * 17 * 19 * 2 * 3 and fig["rows_per_patient"] == 1938
    assert fig["reads"] > 0 and fig["read_errors"] == 0 and fig["reads_live"] == fig["reads"]
    assert fig["reads_incomplete_patient"] == 0
    assert {r["exit"] for r in fig["analytics"].values()} == {0}
    assert fig["planted_outliers"] == 1 and 0.0 <= fig["planted_roc_auc"] <= 1.0
    # the analytics alone, again, on the store just written (how a 100,000-patient store is re-timed)
    again = tmp_path / "again.json"
    proc, fig = run_benchmark("store_scale.py", "--analytics", "only", "--n-boot", "20", "--db",
                              str(tmp_path / "scale.duckdb"), out=again)
    assert fig["analytics_only"] and fig["patients"] == 40 and fig["importance_rows"] == 40 * 1938
    assert all(fig[k] > 0 for k in ("anomaly_s", "audit_s", "graph_s", "report_s", "peak_rss_gb"))
