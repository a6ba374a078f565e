"""The layout-exactness benchmark at tiny size: it runs, and every fp32 path is within rounding of float64."""

from __future__ import annotations

from tests.benchmarks.script import run_benchmark


def test_layout_exactness_tiny(tmp_path):
    out = tmp_path / "layouts.json"
    proc, fig = run_benchmark("layout_exactness.py", "--size", "16", "--only", "DynUNet, residual blocks", out=out,
                              timeout=600)
    assert set(fig["errors"]) == {"DynUNet, residual blocks"}
    assert set(fig["errors"]["DynUNet, residual blocks"]) == {"contiguous/torch", "channels-last/torch",
                                                               "channels-last/engine"}
    assert fig["worst"] < 1e-4
