"""Names shared by the store, the analytics, the report and the command line (one owner for each).

A leaf module: it imports only the standard library, so the command line can build its options (``--sign``,
``--db``) without loading DuckDB, torch or Ray.
"""

from __future__ import annotations

import re

#: Importance statistics per (target, RoI): ``mass`` (share of the attribution) and ``mean`` (per voxel).
STATS: tuple[str, ...] = ("mass", "mean")
#: Attribution signs aggregated: absolute value, positive part, negative part.
SIGNS: tuple[str, ...] = ("abs", "pos", "neg")
#: The ``target`` under which a patient's mean anomaly score over classes is stored.
MEAN_TARGET = "__mean__"
#: The store file commands use when ``--db`` is not given.
DEFAULT_DB = "agg2exp.duckdb"
#: Columns of the ``predictions`` table that are anomaly features, and the feature kind each becomes
#: (the part of a feature name before the first ``|``, e.g. ``pred_entropy|liver``).
PREDICTION_FEATURES: tuple[tuple[str, str], ...] = (
    ("voxels", "pred_voxels"), ("confidence", "pred_confidence"), ("entropy", "pred_entropy"),
    ("input_mean", "input_mean"), ("input_std", "input_std"), ("input_local", "input_local"),
)



def safe_filename(text: str) -> str:
    """``text`` as one file-name component: runs of characters other than ``A-Za-z0-9._-`` become ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("_") or "unnamed"


__all__ = ["DEFAULT_DB", "MEAN_TARGET", "PREDICTION_FEATURES", "SIGNS", "STATS", "safe_filename"]
