"""The compiled-kernels benchmark: it runs both kernel sets in a fresh process and reports every figure."""

from __future__ import annotations

import pytest

from tests.benchmarks.script import run_benchmark


@pytest.mark.slow
def test_compiled_kernels_benchmark_compares_both_kernel_sets(tmp_path):
    out = tmp_path / "compiled.json"
    proc, fig = run_benchmark("compiled_kernels.py", "--rois", "24,16,16", "--repeats", "1", "--float64", out=out,
                              timeout=900)
    assert "paid off after" in proc.stdout and "vs float64" in proc.stdout
    (row,) = fig["rows"]
    assert row["roi"] == [24, 16, 16] and row["classes"] > 1 and not row["auto_compiles"]
    assert row["seconds"]["engine"] > 0 and row["seconds"]["compiled"] > 0 and row["compile_s"] is not None
    assert row["maps_rel_diff_compiled_vs_engine"] < 1e-5
    # both fp32 maps are as close to float64 as each other
    err = row["vs_float64"]
    assert err["compiled"]["l2"] <= 2 * err["engine"]["l2"] + 1e-7
