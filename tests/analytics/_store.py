"""A real store for analytics tests: the shared reference CSV plus a few synthetic patients.

The 32 imported patients get deterministic synthetic metadata (sex, age, site); three more
patients are added through the ordinary writer path: two done (importances copied from a real
patient, slightly changed) and one failed, so that every named query has something to show.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from engine import store
from engine.analytics.anomaly import score_run
from engine.commands.import_csv import import_reference_csv
from engine.store import PatientResult
from tests._data import shared_data

RUN_ID = "ref"
CSV_NAME = "tsv2_test_aggregated_sg_explanations_with_dice.csv"


def reference_csv() -> Path:
    """The shared reference CSV, or skip the test when the shared data is absent."""
    path = shared_data() / "agg2exp" / CSV_NAME
    if not path.is_file():
        pytest.skip(f"shared reference CSV not found at {path} (set AGG2EXP_SHARED_DATA to the folder holding agg2exp/)")
    return path


def synthetic_metadata(patient_ids: list[str]) -> pl.DataFrame:
    """Deterministic metadata: alternating sex, ages 40.., three sites."""
    return pl.DataFrame({
        "patient_id": patient_ids,
        "sex": ["F" if i % 2 == 0 else "M" for i in range(len(patient_ids))],
        "age": [40 + i for i in range(len(patient_ids))],
        "site": ["abc"[i % 3] for i in range(len(patient_ids))],
    })


def build_store(path: Path, *, n_estimators: int = 50) -> Path:
    """Create the test store at ``path`` and return it."""
    csv = reference_csv()
    with store.open_writer(path) as s:
        from engine.analytics.reference import read_reference_csv

        ids = read_reference_csv(csv).patient_ids
        import_reference_csv(s, csv, run_id=RUN_ID, metadata=synthetic_metadata(ids))
        manifest = pl.DataFrame({
            "patient_id": ["syn1", "syn2", "syn3"],
            "image_path": ["/img/syn1.nii.gz", "/img/syn2.nii.gz", "/img/syn3.nii.gz"],
            "sex": ["F", "M", "F"],
            "age": [70, 75, 80],
            "site": ["d", "d", "d"],
        })
        s.register_patients(RUN_ID, manifest)
        base = s.importances(RUN_ID).filter(pl.col("patient_id") == ids[0])
        base_pred = s.predictions(RUN_ID).filter(pl.col("patient_id") == ids[0])
        for pid, factor in (("syn1", 1.0), ("syn2", 1.5)):
            imp = base.select("method", "target", "roi", "stat", "sign",
                              (pl.col("value") * factor).alias("value"))
            pred = base_pred.select("class", "voxels", "dice", "iou")
            s.write_patient(RUN_ID, PatientResult(patient_id=pid, importances=imp, predictions=pred))
        s.mark_failed(RUN_ID, "syn3", error="VolumeError: label map shape differs from image")
        model, scores = score_run(s, run_id=RUN_ID, seed=0, n_estimators=n_estimators)
        s.write_anomaly(model=model, scores=scores)
        s.write_anomaly_reasons(model_id=model["model_id"], run_id=RUN_ID, reasons=model["reasons"])
    return path


@pytest.fixture(scope="module")
def analytics_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of a store built once per test module."""
    return build_store(tmp_path_factory.mktemp("analytics") / "test.duckdb")
