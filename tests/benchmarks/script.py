"""Run a ``benchmarks/`` script as a user would and read the figures it writes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def run_benchmark(script: str, *args: str, out: Path, cwd: Path = ROOT,
                  timeout: int = 900) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """``python benchmarks/<script> <args> --json <out>``: its completed process (checked for exit 0,
    with the end of its output in the failure message) and the JSON figures it wrote."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args, "--json", str(out)],
                          capture_output=True, text=True, cwd=cwd, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(out.read_text())
