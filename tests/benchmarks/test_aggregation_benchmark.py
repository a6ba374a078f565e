"""The aggregation benchmark at tiny size: it runs, and its three formulations agree to rounding."""

from __future__ import annotations

from tests.benchmarks.script import run_benchmark


def test_aggregation_benchmark_tiny(tmp_path):
    proc, fig = run_benchmark("aggregation.py", "--demo-shape", "6", "5", "4", "--ct-shape", "10", "9", "8",
                              "--classes", "3", "--ct-classes", "2", "--rois", "7", "--repeats", "2",
                              out=tmp_path / "agg.json", timeout=300)
    assert set(fig["cases"]) == {"demo", "ct"}
    for c in fig["cases"].values():
        assert c["rel_diff_engine_vs_stacked"] < 1e-12 and c["rel_diff_engine_vs_masked_sums"] < 1e-12
        assert c["engine_s"] > 0 and c["stacked_over_engine"] > 0
    assert fig["cases"]["ct"]["rois"] == 7 and fig["cases"]["demo"]["rois"] == 3
    assert "slower" in proc.stdout
