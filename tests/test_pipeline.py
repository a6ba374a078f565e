"""PatientProcessor without Ray: results, failures as records, and maps saved for viewers."""

from __future__ import annotations

import nibabel as nib
import numpy as np

from engine import phantoms
from engine.jobs import JobSpec
from engine.pipeline import Failure, PatientProcessor
from engine.store import PatientResult


def test_processor_results_failures_and_saved_maps(tmp_path):
    manifest = phantoms.generate_cohort(tmp_path / "cohort", n_patients=1, seed=2, anomaly_fraction=0.0)
    record = manifest.row(0, named=True)
    spec = JobSpec.from_dict(
        {
            "job": {"name": "maps"},
            "cohort": {"manifest": str(tmp_path / "cohort" / "manifest.csv")},
            "model": {"kind": "demo"},
            "attribution": {"method": "saliency", "targets": ["aorta", "heart"],
                            "save_maps": [record["patient_id"]], "maps_dir": str(tmp_path / "maps")},
        },
        base_dir=tmp_path,
    )
    proc = PatientProcessor(spec)
    out = proc.process(record)
    assert isinstance(out, PatientResult)
    assert set(out.importances["target"]) == {"aorta", "heart"}
    assert set(out.importances["method"]) == {"saliency"}
    assert out.predictions.height == 17 and out.predictions["dice"].drop_nulls().len() == 17
    assert out.timings and out.timings["work_vjps"] > 0
    source = nib.load(record["image_path"])
    saved = sorted((tmp_path / "maps" / record["patient_id"]).glob("*.nii.gz"))
    assert {p.name for p in saved} >= {"saliency_aorta.nii.gz", "saliency_heart.nii.gz", "prediction.nii.gz"}
    for path in saved:
        img = nib.load(path)
        assert img.shape == source.shape
        np.testing.assert_allclose(img.affine, source.affine)
    failed = proc.process({"patient_id": "ghost", "image_path": str(tmp_path / "ghost.nii.gz")})
    assert isinstance(failed, Failure) and "ghost" in failed.error and failed.traceback
