"""The layout-exactness benchmark at tiny size: it runs, and every fp32 path is within rounding of float64."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_layout_exactness_tiny(tmp_path):
    out = tmp_path / "layouts.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "layout_exactness.py"), "--size", "16",
         "--only", "DynUNet, residual blocks", "--json", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    fig = json.loads(out.read_text())
    assert set(fig["errors"]) == {"DynUNet, residual blocks"}
    assert set(fig["errors"]["DynUNet, residual blocks"]) == {"contiguous/torch", "channels-last/torch",
                                                               "channels-last/engine"}
    assert fig["worst"] < 1e-4
