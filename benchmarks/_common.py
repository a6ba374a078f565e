"""What the benchmark scripts share (they run as scripts: ``python benchmarks/<name>.py``).

``attribution_gpu.py`` does not use it: it is carried alone to GPU machines.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_json(path: Path | None, result: dict[str, Any]) -> None:
    """The figures as JSON at ``path`` (folders made as needed; nothing when None), and a line saying so."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {path}")
