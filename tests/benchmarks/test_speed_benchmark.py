"""The side-by-side speed benchmark: it runs, reports every figure, and the engine's fp32 maps equal Captum's."""

from __future__ import annotations

import pytest

from tests.benchmarks.script import run_benchmark


@pytest.mark.slow
def test_speed_benchmark_reports_ratios_flops_and_exact_fp32_maps(tmp_path):
    out = tmp_path / "speed.json"
    proc, fig = run_benchmark("attribution_speed.py", "--repeats", "1", "--prim-reps", "1", out=out, timeout=1200)
    for phrase in ("Captum recipe / engine fp32", "bf16 speed-up over fp32", "of matmul", "load average"):
        assert phrase in proc.stdout, phrase
    assert fig["classes"] > 1
    assert fig["maps_rel_err_fp32_vs_captum"] <= 1e-5
    assert fig["maps_rel_err_compiled_vs_captum"] <= 1e-5 and fig["compiled_speedup_over_fp32"] > 0
    # against float64 (Captum's recipe on the same masks) the engine is as close as Captum's fp32 is
    assert fig["maps_rel_l2_fp32_vs_float64"] <= max(1e-6, 2 * fig["maps_rel_l2_captum_vs_float64"])
    assert fig["primitives"]["fp32_compiled"]["first_step_s"] > 0
    for name in ("fp32_contiguous", "fp32_channels_last", "fp32_compiled", "bf16_channels_last"):
        prim = fig["primitives"][name]
        assert prim["forward_flops"] > 0 and prim["vjp_flops"] > 0 and prim["forward_of_matmul"] > 0
