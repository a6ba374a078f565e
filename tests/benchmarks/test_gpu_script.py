"""The GPU benchmark script's dry run: same code path on the CPU at tiny sizes, figures written as JSON."""

from __future__ import annotations

from tests.benchmarks.script import run_benchmark


def test_gpu_script_dry_run_writes_figures(tmp_path):
    out = tmp_path / "gpu.json"
    proc, fig = run_benchmark("attribution_gpu.py", "--dry-run", "--skip-install", out=out)
    assert fig["dry_run"] is True and "error" not in fig
    for key in ("engine_s", "reference_s", "speedup_vs_reference", "flops_forward", "flops_vjp",
                "achieved_flops_per_s", "spearman_bf16_vs_fp32", "engine_work", "reference"):
        assert key in fig, key
    assert fig["engine_s"] > 0 and fig["reference_s"] > 0 and fig["flops_forward"] > 0
    assert fig["reference_extrapolated"] is True
    assert fig["engine_work"]["vjps"] > 0
    assert -1.0 <= fig["spearman_bf16_vs_fp32"] <= 1.0
    assert "flop_utilisation" in fig  # None on a CPU: no peak bf16 figure for it
    assert "EXTRAPOLATED" in proc.stdout and "speed-up" in proc.stdout
