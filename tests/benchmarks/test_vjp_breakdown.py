"""The VJP breakdown benchmark: every node of a class VJP timed in float32 and bf16, paired by role."""

from __future__ import annotations

import pytest

from tests.benchmarks.script import run_benchmark


@pytest.mark.slow
def test_vjp_breakdown_pairs_float32_and_bf16_nodes(tmp_path):
    out = tmp_path / "vjp.json"
    png = tmp_path / "vjp.png"
    proc, fig = run_benchmark("vjp_breakdown.py", "--roi", "24", "16", "16", "--repeats", "2", "--classes", "3",
                              "--plot", str(png), out=out, timeout=600)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert "class VJP" in proc.stdout and "goal 1.8" in proc.stdout
    rows = {r["node"]: r for r in fig["rows"]}
    # the head's convolution and its norm are timed in both precisions under one role each, though the
    # engine routes them differently (float32: its folded residual and own norm; bf16: PyTorch's)
    for node in ("conv3d 1x17x24x16x16", "conv_transpose3d 1x17x24x16x16", "instance_norm 1x17x24x16x16",
                 "activation 1x17x24x16x16"):
        assert rows[node]["fp32_ms"] > 0 and rows[node]["bf16_ms"] > 0, node
        assert rows[node]["ratio"] == pytest.approx(rows[node]["fp32_ms"] / rows[node]["bf16_ms"])
    s = fig["summary"]
    for tag in ("fp32", "bf16"):
        t = s[tag]
        assert 0 < t["nodes_ms"] and t["vjp_ms"] > 0 and t["forward_ms"] > 0
        assert t["window_ms"] == pytest.approx(t["forward_ms"] + 3 * t["vjp_ms"])
        assert t["outside_nodes_ms"] == pytest.approx(t["vjp_hooked_ms"] - t["nodes_ms"])
    assert s["window_speedup"] == pytest.approx(s["fp32"]["window_ms"] / s["bf16"]["window_ms"])
    assert 0 <= s["bf16_share_in_little_gain_nodes"] <= 1 and s["matmul_speedup"] > 0
    conv = sum(r["bf16_ms"] for r in fig["rows"] if r["node"].split()[0] in ("conv3d", "conv_transpose3d"))
    assert s["bf16_convolutions_ms"] == pytest.approx(conv) and conv < s["bf16"]["nodes_ms"]
    assert s["window_speedup_bound_convolutions_only"] == pytest.approx(
        s["fp32"]["window_ms"] / (s["bf16"]["forward_ms"] + 3 * conv))
    assert s["window_speedup_bound_convolutions_only"] > s["window_speedup"]
