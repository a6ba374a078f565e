"""The bf16 convolution benchmark runs, writes every figure, and its two input gradients agree."""

from __future__ import annotations

import pytest
import torch

from tests.benchmarks.script import run_benchmark


@pytest.mark.skipif(not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()),
                    reason="this CPU or PyTorch build has no oneDNN bf16 convolutions")
def test_bf16_convolutions_runs_and_the_direct_gradient_is_pytorchs(tmp_path):
    out = tmp_path / "bf16_conv.json"
    proc, fig = run_benchmark("bf16_convolutions.py", "--repeats", "1", out=out, timeout=600)
    assert [r["layer"] for r in fig["layers"]] == ["17->17 at 48^3", "16->17 at 48^3", "32->16 at 48^3",
                                                  "64->32 at 24^3"]
    for r in fig["layers"]:
        assert r["input_gradients_max_rel_diff"] < 1e-2  # bf16 rounding at most; measured: equal
        assert r["autocast_over_direct"] > 0 and r["direct_forward_ms"] > 0
