"""What one patient's processing sends back to the writer: small records, no database.

This module sits low in the layers so that Ray workers (``engine.pipeline``) can build results
without importing DuckDB; the store (``engine.store``) receives them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import polars as pl


@dataclass(frozen=True)
class PatientResult:
    """One patient's RoI rows and per-class prediction records.

    ``importances``: method, target, roi, stat (mass|mean), sign (abs|pos|neg), value;
    ``predictions``: class, voxels, dice, iou.
    """

    patient_id: str
    importances: pl.DataFrame
    predictions: pl.DataFrame
    worker: str | None = None
    seconds: float | None = None
    timings: Mapping[str, float] | None = None
