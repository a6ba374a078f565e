"""agg2exp engine: aggregated attributions for explaining 3D segmentation models across cohorts."""

from __future__ import annotations

__version__ = "0.1.0"
