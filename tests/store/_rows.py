"""Small patient results of the real shape for store tests (a few targets and RoIs, every stat and sign)."""

from __future__ import annotations

import numpy as np
import polars as pl

from engine.results import PatientResult

TARGETS = ("aorta", "heart", "trachea")
ROIS = ("background", "aorta", "heart", "trachea")
STATS = ("mass", "mean")
SIGNS = ("abs", "pos", "neg")
ROWS_PER_PATIENT = len(TARGETS) * len(ROIS) * len(STATS) * len(SIGNS)


def result(patient_id: str, *, seed: int = 0, method: str = "smoothgrad") -> PatientResult:
    rng = np.random.default_rng(seed)
    keys = [(t, r, st, sg) for t in TARGETS for r in ROIS for st in STATS for sg in SIGNS]
    imp = pl.DataFrame(keys, schema=["target", "roi", "stat", "sign"], orient="row").with_columns(
        pl.lit(method).alias("method"), pl.Series("value", rng.random(len(keys))))
    pred = pl.DataFrame({"class": ["background", *TARGETS], "voxels": [1000, 10, 20, 30],
                         "dice": [0.99, 0.8, 0.9, 0.7], "iou": [0.98, 0.7, 0.8, 0.6]})
    return PatientResult(patient_id=patient_id, importances=imp, predictions=pred, worker="test", seconds=1.0)


def manifest(ids: list[str], **metadata: list[object]) -> pl.DataFrame:
    return pl.DataFrame({"patient_id": ids, "image_path": [f"/img/{i}.nii.gz" for i in ids], **metadata})
