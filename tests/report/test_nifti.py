"""NIfTI export: maps and prediction land on the source image grid with the source affine."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from engine import io, phantoms
from engine.attribution import explain_volume
from engine.models import demo_model
from engine.report.nifti import export_explanation


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("nifti")
    manifest = phantoms.generate_cohort(root / "ph", n_patients=1, seed=3)
    rec = manifest.row(0, named=True)
    # The same CT stored in LPS voxel order: flip x and y, and move the origin accordingly.
    src = nib.load(rec["image_path"])
    data = np.asarray(src.dataobj)
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[0, 3] = data.shape[0] - 1
    flip[1, 3] = data.shape[1] - 1
    lps = nib.Nifti1Image(data[::-1, ::-1, :].copy(), src.affine @ flip)
    lps_path = root / "lps.nii.gz"
    nib.save(lps, str(lps_path))
    assert "".join(nib.aff2axcodes(lps.affine)) == "LPS"
    return {"record": rec, "lps": {"patient_id": rec["patient_id"], "image_path": str(lps_path)}, "root": root}


@pytest.fixture(scope="module")
def model():
    return demo_model(weights=None)


@pytest.fixture(scope="module")
def ras_export(phantom: dict, model) -> tuple:
    """The phantom as stored (RAS), model grid = source grid; exported once for two tests."""
    out = phantom["root"] / "ras_export"
    return (*_export(model, phantom["record"], io.PreprocessSpec(), out), out)


def _export(model, record: dict, preprocess: io.PreprocessSpec, out: Path):
    case = io.load_case(record, preprocess=preprocess)
    ex = explain_volume(model.module, case.image, targets=["aorta"], class_names=model.class_names,
                        window=model.roi_size, return_maps=True, n_samples=1, seed=0)
    assert ex.maps and "aorta" in ex.maps
    return case, ex, export_explanation(case, ex, out)


def _check_on_source_grid(paths: list[Path], image_path: str) -> dict[str, nib.Nifti1Image]:
    src = nib.load(image_path)
    imgs = {p.name: nib.load(str(p)) for p in paths if p.name.endswith(".nii.gz")}
    assert {"smoothgrad_aorta.nii.gz", "prediction.nii.gz"} <= set(imgs)
    for name, img in imgs.items():
        assert img.shape == src.shape, name
        np.testing.assert_allclose(img.affine, src.affine, atol=1e-4, err_msg=name)
        assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
    assert imgs["smoothgrad_aorta.nii.gz"].get_data_dtype() == np.float32
    assert imgs["prediction.nii.gz"].get_data_dtype() == np.uint8
    return imgs


def test_identity_grid_round_trip(phantom: dict, model, ras_export: tuple) -> None:
    case, ex, paths, out = ras_export
    imgs = _check_on_source_grid(paths, phantom["record"]["image_path"])
    np.testing.assert_allclose(imgs["smoothgrad_aorta.nii.gz"].get_fdata(), ex.maps["aorta"].numpy(), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(imgs["prediction.nii.gz"].dataobj), ex.prediction.numpy())
    lines = (out / "classes.txt").read_text().splitlines()
    entries = [ln for ln in lines if ln.strip() and not ln.startswith("#")]
    assert len(entries) == len(model.class_names)
    assert entries[1].split()[0] == "1" and entries[1].endswith('"aorta"')
    assert (out / "classes.ctbl").is_file()


def test_lps_source_gets_maps_in_its_own_voxel_order(phantom: dict, model, ras_export: tuple, tmp_path: Path) -> None:
    ras_dir = ras_export[3]
    case, ex, paths = _export(model, phantom["lps"], io.PreprocessSpec(), tmp_path / "lps")
    assert case.meta["source_orientation"] == "LPS" and case.meta["orientation"] == "RAS"
    imgs = _check_on_source_grid(paths, phantom["lps"]["image_path"])
    ras_map = nib.load(str(ras_dir / "smoothgrad_aorta.nii.gz")).get_fdata()
    # Same physical image, so the same map; stored in LPS order it is the RAS map flipped in x and y.
    np.testing.assert_allclose(imgs["smoothgrad_aorta.nii.gz"].get_fdata(), ras_map[::-1, ::-1, :], atol=1e-4)
    ras_pred = np.asarray(nib.load(str(ras_dir / "prediction.nii.gz")).dataobj)
    np.testing.assert_array_equal(np.asarray(imgs["prediction.nii.gz"].dataobj), ras_pred[::-1, ::-1, :])


def test_resampled_model_grid_goes_back_to_source(phantom: dict, model, tmp_path: Path) -> None:
    case, ex, paths = _export(model, phantom["record"], io.PreprocessSpec(spacing=(10.0, 10.0, 10.0)), tmp_path)
    assert case.shape != tuple(nib.load(phantom["record"]["image_path"]).shape)  # really resampled
    imgs = _check_on_source_grid(paths, phantom["record"]["image_path"])
    amap = imgs["smoothgrad_aorta.nii.gz"].get_fdata()
    assert np.isfinite(amap).all() and np.abs(amap).max() > 0
    pred = np.asarray(imgs["prediction.nii.gz"].dataobj)
    assert set(np.unique(pred)) <= set(range(len(model.class_names)))
    # nearest-neighbour resampling keeps the predicted classes and roughly their volumes (in mm^3)
    src_vox = float(np.prod(nib.load(phantom["record"]["image_path"]).header.get_zooms()[:3]))
    model_vol = float((ex.prediction == 1).sum()) * float(np.prod(case.spacing))
    assert (pred == 1).sum() * src_vox == pytest.approx(model_vol, rel=0.35)
    assert torch.is_tensor(ex.maps["aorta"])
