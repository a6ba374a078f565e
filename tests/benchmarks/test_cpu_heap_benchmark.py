"""The CPU heap benchmark: fresh processes with and without the engine's setting, bitwise equal maps."""

from __future__ import annotations

import pytest

from engine.runtime import heap
from tests.benchmarks.script import run_benchmark


@pytest.mark.slow
@pytest.mark.skipif(heap._glibc() is None, reason="the C library is not glibc (nothing to tune)")
def test_heap_benchmark_compares_both_settings_in_fresh_processes(tmp_path):
    out = tmp_path / "heap.json"
    proc, fig = run_benchmark("cpu_heap.py", "--rounds", "1", "--repeats", "1", "--methods", "saliency", out=out,
                              timeout=600)
    assert "default / keep" in proc.stdout and "load average" in proc.stdout
    s = fig["methods"]["saliency"]
    assert s["maps_bitwise_equal"] is True
    assert s["reasons"]["default"] == "AGG2EXP_CPU_HEAP=default: the C library's own thresholds"
    assert s["reasons"]["keep"].startswith("glibc thresholds set")
    assert len(s["per_process_s"]["default"]) == len(s["per_process_s"]["keep"]) == 1
    assert s["default_over_keep"] > 0


@pytest.mark.slow
def test_heap_growth_mode_records_resident_memory_after_every_volume(tmp_path):
    out = tmp_path / "growth.json"
    proc, fig = run_benchmark("cpu_heap.py", "--growth", "2", "--settings", "keep,keep-all", out=out, timeout=600)
    assert "resident memory after" in proc.stdout
    for setting in ("keep", "keep-all"):
        run = fig["runs"][setting]
        assert len(run["rss_mb"]) == len(run["times"]) == 2 and all(m > 0 for m in run["rss_mb"])
        assert run["rss_max_mb"] >= run["rss_end_mb"] > 0
    assert fig["runs"]["keep-all"]["reason"].startswith("glibc thresholds set, no block mapped")
