"""The pipeline on real CTs (TotalSegmentator examples) and orientation invariance."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import polars as pl
import pytest
import torch

from engine import phantoms, store
from engine.jobs import JobSpec
from engine.labels import THORAX_CLASSES
from engine.pipeline import PatientProcessor
from engine.store import PatientResult
from tests._data import totalseg_dir


def _manifest(tmp_path: Path, data: Path) -> Path:
    path = tmp_path / "manifest.csv"
    pl.DataFrame({
        "patient_id": ["ts-nifti"],
        "image_path": [str(data / "example_ct_sm.nii.gz")],
        "roi_ts": [str(data / "example_seg.nii.gz")],
        "site": ["tsexample"],
    }).write_csv(path)
    return path


@pytest.mark.parametrize("model_name", ["demo", "swin"])
def test_real_ct_through_attribution_aggregation_and_store(tmp_path, model_name):
    data = totalseg_dir()
    manifest = _manifest(tmp_path, data)
    if model_name == "demo":
        model = {"kind": "demo"}
    else:
        pytest.importorskip("einops")
        model = {
            "kind": "network", "name": "SwinUNETR", "roi_size": [64, 64, 64], "in_channels": 1,
            "args": {"in_channels": 1, "out_channels": 17, "feature_size": 12, "use_v2": True, "spatial_dims": 3},
            "class_names": list(THORAX_CLASSES),
        }
    spec = JobSpec.from_dict({
        "job": {"name": f"real-{model_name}"},
        "cohort": {"manifest": str(manifest)},
        "model": model,
        "preprocess": {"orientation": "RAS", "spacing": [6.0, 6.0, 6.0], "pad_to": [48, 40, 40] if model_name == "demo" else [64, 64, 64]},
        "attribution": {"method": "saliency"},
        "rois": {"source": "ts", "label_names": str(data / "classes_total.json"), "preset": "totalsegmentator_thorax"},
    })
    torch.manual_seed(0)
    proc = PatientProcessor(spec)
    record = pl.read_csv(manifest).row(0, named=True)
    out = proc.process(record)
    assert isinstance(out, PatientResult), out
    mass = out.importances.filter((pl.col("stat") == "mass") & (pl.col("sign") == "abs"))
    sums = mass.group_by("target").agg(pl.col("value").sum())
    assert sums.height >= 1
    assert np.allclose(sums["value"].to_numpy(), 1.0, atol=1e-9)  # TotalSegmentator RoIs partition the volume
    rois = set(mass["roi"].to_list())
    assert {"lung_upper_lobe_left", "vertebrae", "ribs"} & rois  # mapped TotalSegmentator labels
    db = tmp_path / "real.duckdb"
    with store.open_writer(db) as w:
        w.create_run("real", config=spec.to_dict())
        w.register_patients("real", pl.read_csv(manifest))
        w.write_patient("real", out)
    with store.open(db) as s:
        assert s.status_counts("real")["done"] == 1
        assert s.importances("real").height == out.importances.height  # type: ignore[union-attr]


def test_lps_volume_gives_the_same_importances_as_ras(tmp_path):
    p = phantoms.make_phantom(2, seed=5)
    ras_img = tmp_path / "ras.nii.gz"
    ras_lab = tmp_path / "ras_lab.nii.gz"
    nib.save(nib.Nifti1Image(p.image.astype(np.float32), p.affine), ras_img)
    nib.save(nib.Nifti1Image(p.labels, p.affine), ras_lab)
    # The same voxels stored LPS: flip x and y in the array and in the affine.
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[0, 3] = (p.image.shape[0] - 1)
    flip[1, 3] = (p.image.shape[1] - 1)
    lps_affine = p.affine @ flip
    lps_img = tmp_path / "lps.nii.gz"
    lps_lab = tmp_path / "lps_lab.nii.gz"
    nib.save(nib.Nifti1Image(p.image[::-1, ::-1].astype(np.float32).copy(), lps_affine), lps_img)
    nib.save(nib.Nifti1Image(p.labels[::-1, ::-1].copy(), lps_affine), lps_lab)
    assert nib.aff2axcodes(lps_affine) == ("L", "P", "S")
    spec = JobSpec.from_dict({
        "job": {"name": "orient"}, "cohort": {"phantoms": 1}, "model": {"kind": "demo"},
        "attribution": {"method": "smoothgrad", "n_samples": 2},
    })
    proc = PatientProcessor(spec)
    a = proc.process({"patient_id": "x", "image_path": str(ras_img), "label_path": str(ras_lab)})
    b = proc.process({"patient_id": "x", "image_path": str(lps_img), "label_path": str(lps_lab)})
    assert isinstance(a, PatientResult) and isinstance(b, PatientResult)
    keys = ["target", "roi", "stat", "sign"]
    j = a.importances.join(b.importances.select([*keys, pl.col("value").alias("lps")]), on=keys, how="full", coalesce=True)
    assert j.height == a.importances.height == b.importances.height
    np.testing.assert_allclose(j["value"].to_numpy(), j["lps"].to_numpy(), rtol=1e-5, atol=1e-9)
    assert a.predictions.equals(b.predictions)
