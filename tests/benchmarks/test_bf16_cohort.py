"""The whole-pipeline bf16 benchmark: two runs of the demo job, compared on importances, anomaly ranking and audit."""

from __future__ import annotations

import pytest

from tests.benchmarks.script import run_benchmark


@pytest.mark.slow
def test_bf16_cohort_benchmark_compares_both_runs(tmp_path):
    out = tmp_path / "bf16_cohort.json"
    proc, fig = run_benchmark("bf16_cohort.py", "--patients", "5", "--workers", "1", "--dir", str(tmp_path / "work"),
                              out=out, cwd=tmp_path)
    assert fig["patients"] == 5 and fig["autocast"] == "bf16"
    assert fig["mass_pairs"] > 0 and -1.0 <= fig["mass_spearman_min"] <= fig["mass_spearman_median"] <= 1.0
    assert -1.0 <= fig["anomaly_spearman"] <= 1.0 and 0.0 <= fig["anomaly_top_k_overlap"] <= 1.0
    assert set(fig["audit"]) == {"site", "sex", "age", "contrast", "random_group"}
    for c in fig["audit"].values():
        assert 0 <= c["fp32"] <= c["tests"] and 0 <= c["bf16"] <= c["tests"] and c["tests"] > 0
        assert c["fp32_only"] <= c["fp32"] and c["bf16_only"] <= c["bf16"]
    assert fig["attribute_median_s"]["fp32"] > 0 and fig["attribute_median_s"]["bf16"] > 0
    assert "audit random_group" in proc.stdout and "anomaly ranking" in proc.stdout
