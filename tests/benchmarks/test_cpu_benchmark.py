"""The CPU attribution benchmark at tiny size: its figures, and the engine's maps equal the reference's."""

from __future__ import annotations

from tests.benchmarks.script import run_benchmark


def test_cpu_benchmark_tiny(tmp_path):
    out = tmp_path / "cpu.json"
    proc, fig = run_benchmark("attribution_cpu.py", "--shape", "24", "20", "20", "--repeats", "1", "--samples", "1",
                              out=out, timeout=1200)
    text = proc.stdout
    for phrase in ("seconds per patient", "engine/irreducible", "reference/engine", "forward equivalents",
                   "max relative error", "peak memory"):
        assert phrase in text, phrase
    for key in ("engine_s", "irreducible_s", "reference_s", "engine_over_irreducible", "reference_over_engine",
                "vjp_per_forward", "engine_forward_equivalents", "maps_max_rel_err", "memory"):
        assert key in fig, key
    assert fig["config"]["windows"] > 1  # larger than one window
    assert fig["maps_match"] and fig["maps_max_rel_err"] <= 1e-4
    assert fig["mass_max_abs_err"] <= 1e-6
    assert fig["engine_work"]["vjps"] > 0
    assert {"classes_1_mb", "classes_8_mb", "classes_17_mb", "ratio_17_vs_1"} <= set(fig["memory"])
