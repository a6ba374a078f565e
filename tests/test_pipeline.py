"""PatientProcessor without Ray: results, failures as records, and maps saved for viewers."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import polars as pl
import pytest

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


def test_prediction_confidence_and_entropy_match_a_hand_computed_softmax() -> None:
    import torch
    from scipy.special import softmax
    from scipy.stats import entropy

    from engine.pipeline import prediction_confidence

    rng = np.random.default_rng(0)
    logits = rng.normal(scale=3.0, size=(4, 3, 5, 6)).astype(np.float32)
    logits[3] -= 50.0  # class 3 is never predicted
    pred = logits.argmax(0)
    conf, ent = prediction_confidence(torch.from_numpy(logits), torch.from_numpy(pred))
    p = softmax(logits.astype(np.float64), axis=0)
    for c in range(3):
        mask = pred == c
        assert conf[c] == pytest.approx(p.max(0)[mask].mean(), rel=1e-5)
        assert ent[c] == pytest.approx(entropy(p, axis=0)[mask].mean(), rel=1e-4)
    assert conf[3] is None and ent[3] is None


def test_input_statistics_match_numpy_over_each_predicted_class() -> None:
    import torch

    from engine.pipeline import input_statistics

    rng = np.random.default_rng(1)
    image = rng.normal(1000.0, 3.0, size=(2, 4, 5, 6))  # a large offset: a one-pass variance would cancel
    pred = rng.integers(0, 3, size=(4, 5, 6))  # class 3 never predicted
    mean, std = input_statistics(torch.from_numpy(image).float(), torch.from_numpy(pred), 4)
    voxel = image.astype(np.float32).astype(np.float64).mean(0)
    for c in range(3):
        assert mean[c] == pytest.approx(voxel[pred == c].mean(), rel=1e-9)
        assert std[c] == pytest.approx(voxel[pred == c].std(), rel=1e-6)
    assert mean[3] is None and std[3] is None
    with pytest.raises(ValueError, match="same grid"):
        input_statistics(torch.zeros(1, 3, 3, 3), torch.zeros(2, 2, 2, dtype=torch.long), 2)


def test_input_local_contrast_matches_scipy_uniform_filter_and_numpy_quantiles() -> None:
    import torch
    from scipy import ndimage

    from engine.pipeline import input_local_contrast

    rng = np.random.default_rng(2)
    image = rng.normal(0.0, 1.0, size=(2, 9, 7, 8))
    pred = rng.integers(0, 4, size=(9, 7, 8))
    pred[pred == 2] = 1  # class 2 never predicted
    pred[0, 0, 0] = 4  # class 4: one voxel (every quantile is that voxel)
    voxel = image.astype(np.float32).astype(np.float64).mean(0)
    local = np.abs(voxel - ndimage.uniform_filter(voxel, size=3, mode="nearest"))
    for q in (0.0, 0.5, 0.9, 0.999, 1.0):
        got = input_local_contrast(torch.from_numpy(image).float(), torch.from_numpy(pred), 6, q=q)
        for c in (0, 1, 3, 4):
            assert got[c] == pytest.approx(np.quantile(local[pred == c], q), rel=1e-5, abs=1e-6), (q, c)
        assert got[2] is None and got[5] is None


def test_input_local_contrast_sees_a_few_bright_voxels_that_the_class_mean_hides() -> None:
    import torch

    from engine.pipeline import input_local_contrast, input_statistics

    rng = np.random.default_rng(3)
    image = rng.normal(0.0, 0.01, size=(1, 20, 20, 20))
    pred = np.zeros((20, 20, 20), dtype=np.int64)
    lead = image.copy()
    lead[0, 10, 10, 5:15] = 1.0  # a wire: 10 of 8,000 voxels
    clean = input_local_contrast(torch.from_numpy(image).float(), torch.from_numpy(pred), 1)[0]
    wired = input_local_contrast(torch.from_numpy(lead).float(), torch.from_numpy(pred), 1)[0]
    assert wired > 10 * clean
    mean_clean = input_statistics(torch.from_numpy(image).float(), torch.from_numpy(pred), 1)[0][0]
    mean_wired = input_statistics(torch.from_numpy(lead).float(), torch.from_numpy(pred), 1)[0][0]
    assert abs(mean_wired - mean_clean) < 0.002  # the mean barely moves


def test_input_local_contrast_refuses_bad_input() -> None:
    import torch

    from engine.pipeline import input_local_contrast

    with pytest.raises(ValueError, match="same grid"):
        input_local_contrast(torch.zeros(1, 3, 3, 3), torch.zeros(2, 2, 2, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="q must be in"):
        input_local_contrast(torch.zeros(1, 3, 3, 3), torch.zeros(3, 3, 3, dtype=torch.long), 2, q=1.5)


def test_processor_predictions_hold_confidence_and_entropy_of_predicted_classes(tmp_path) -> None:
    manifest = phantoms.generate_cohort(tmp_path / "cohort", n_patients=1, seed=3, anomaly_fraction=0.0)
    spec = JobSpec.from_dict({"job": {"name": "conf"}, "cohort": {"manifest": str(tmp_path / "cohort" / "manifest.csv")},
                              "model": {"kind": "demo"}, "attribution": {"method": "saliency", "targets": ["heart"]}},
                             base_dir=tmp_path)
    out = PatientProcessor(spec).process(manifest.row(0, named=True))
    pred = out.predictions
    present = pred.filter(pl.col("voxels") > 0)
    assert present.height > 0 and present["confidence"].null_count() == 0
    assert ((present["confidence"] > 0) & (present["confidence"] <= 1)).all()
    n = pred.height  # entropy of a softmax over n classes lies in [0, log n]
    assert ((present["entropy"] >= 0) & (present["entropy"] <= np.log(n) + 1e-9)).all()
    assert pred.filter(pl.col("voxels") == 0)["confidence"].null_count() == pred.filter(pl.col("voxels") == 0).height
    assert present["input_mean"].null_count() == 0 and (present["input_std"] >= 0).all()
    assert present["input_local"].null_count() == 0 and (present["input_local"] >= 0).all()
    assert pred.filter(pl.col("voxels") == 0)["input_mean"].null_count() == pred.filter(pl.col("voxels") == 0).height
