"""A MONAI bundle's own preprocessing is used by default, and a contradicting [preprocess] is refused."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from engine import io
from engine.errors import JobSpecError, ModelError
from engine.jobs import JobSpec
from engine.models import ModelSpec, effective_preprocess, load_model
from engine.pipeline import PatientProcessor

SMALL = dict(spatial_dims=3, in_channels=1, out_channels=3, channels=[4, 8], strides=[2], num_res_units=1)

PREPROCESSING = [
    {"_target_": "LoadImaged", "keys": "image"},
    {"_target_": "EnsureChannelFirstd", "keys": "image"},
    {"_target_": "Orientationd", "keys": "image", "axcodes": "LPS"},
    {"_target_": "Spacingd", "keys": "image", "pixdim": [2.0, 2.5, 3.0], "mode": "nearest"},
    {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": -57, "a_max": 164, "b_min": 0.0, "b_max": 1.0,
     "clip": True},
    {"_target_": "EnsureTyped", "keys": "image"},
]


def _bundle(root: Path, transforms: list[dict]) -> Path:
    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    config = {
        "image_key": "image",
        "network_def": {"_target_": "monai.networks.nets.UNet", **SMALL},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [16, 16, 16]},
        "preprocessing": {"_target_": "Compose", "transforms": transforms},
    }
    (root / "configs" / "inference.json").write_text(json.dumps(config))
    meta = {"version": "0.1", "network_data_format": {
        "inputs": {"image": {"num_channels": 1}},
        "outputs": {"pred": {"num_channels": 3, "channel_def": {"0": "background", "1": "liver", "2": "spleen"}}}}}
    (root / "configs" / "metadata.json").write_text(json.dumps(meta))
    torch.manual_seed(0)
    from monai.networks.nets import UNet

    torch.save(UNet(**SMALL).state_dict(), root / "models" / "model.pt")
    return root


def test_a_bundles_transforms_become_the_preprocess_settings(tmp_path: Path) -> None:
    loaded = load_model(ModelSpec(kind="bundle", path=str(_bundle(tmp_path / "b", PREPROCESSING))))
    pre = effective_preprocess(loaded, {})
    assert pre.orientation == "LPS"
    assert pre.spacing == (2.0, 2.5, 3.0) and pre.interpolation == "nearest"
    assert (pre.a_min, pre.a_max, pre.b_min, pre.b_max, pre.clip) == (-57.0, 164.0, 0.0, 1.0, True)
    assert not pre.crop_foreground
    # keys the bundle leaves open come from the job, and repeating the bundle's values is fine
    pre = effective_preprocess(loaded, {"pad_to": [16, 16, 16], "a_min": -57, "orientation": "LPS"})
    assert pre.pad_to == (16, 16, 16) and pre.a_min == -57.0


def test_a_preprocess_table_that_contradicts_the_bundle_is_refused_saying_where(tmp_path: Path) -> None:
    loaded = load_model(ModelSpec(kind="bundle", path=str(_bundle(tmp_path / "b", PREPROCESSING))))
    with pytest.raises(JobSpecError, match=r"a_min = -1024.*preprocessing\[4\] ScaleIntensityRanged gives a_min = -57"):
        effective_preprocess(loaded, {"a_min": -1024})
    with pytest.raises(JobSpecError, match=r"spacing.*inference.json preprocessing\[3\] Spacingd"):
        effective_preprocess(loaded, {"spacing": [1.5, 1.5, 2.0]})
    # the engine's default orientation (RAS) is not the bundle's
    with pytest.raises(JobSpecError, match="orientation = 'RAS'"):
        effective_preprocess(loaded, {"orientation": "RAS"})


def test_a_bundle_without_an_intensity_transform_means_no_intensity_change(tmp_path: Path) -> None:
    root = _bundle(tmp_path / "b", PREPROCESSING[:4])
    pre = effective_preprocess(load_model(ModelSpec(kind="bundle", path=str(root))), {})
    assert (pre.a_min, pre.a_max, pre.b_min, pre.b_max, pre.clip) == (0.0, 1.0, 0.0, 1.0, False)
    img = np.random.default_rng(1).uniform(-500, 300, size=(6, 5, 4)).astype(np.float32)
    case = io.load_case({"patient_id": "p", "image_path": _nifti(tmp_path / "x.nii.gz", img, spacing=(2.0, 2.5, 3.0))},
                        preprocess=pre)
    # LPS of a RAS-affine file flips the first two axes; the values themselves are untouched HU
    np.testing.assert_allclose(case.image[0].numpy(), img[::-1, ::-1, :], atol=1e-3)


def _nifti(path: Path, arr: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> str:
    nib.save(nib.Nifti1Image(arr, np.diag([*spacing, 1.0])), str(path))
    return str(path)


def test_a_transform_the_engine_cannot_reproduce_is_refused_by_name(tmp_path: Path) -> None:
    transforms = [*PREPROCESSING[:2], {"_target_": "NormalizeIntensityd", "keys": "image", "nonzero": True}]
    root = _bundle(tmp_path / "b", transforms)
    with pytest.raises(ModelError, match=r"preprocessing\[2\] NormalizeIntensityd.*ignore_bundle_preprocessing"):
        load_model(ModelSpec(kind="bundle", path=str(root)))
    loaded = load_model(ModelSpec(kind="bundle", path=str(root), ignore_bundle_preprocessing=True))
    assert loaded.preprocess is None
    assert effective_preprocess(loaded, {"a_min": -1000}).a_min == -1000.0


def test_a_job_on_a_bundle_reads_cases_with_the_bundles_spacing_and_window(tmp_path: Path) -> None:
    root = _bundle(tmp_path / "b", PREPROCESSING)
    rng = np.random.default_rng(0)
    image = rng.uniform(-200, 300, size=(20, 18, 15)).astype(np.float32)
    path = _nifti(tmp_path / "ct.nii.gz", image, spacing=(1.0, 1.25, 1.5))
    (tmp_path / "m.csv").write_text(f"patient_id,image_path\np0,{path}\n")
    spec = JobSpec.from_dict({"job": {"name": "b"}, "cohort": {"manifest": str(tmp_path / "m.csv")},
                              "model": {"kind": "bundle", "path": str(root)},
                              "attribution": {"method": "saliency"}}, base_dir=tmp_path)
    proc = PatientProcessor(spec)
    case = proc.load({"patient_id": "p0", "image_path": path})
    np.testing.assert_allclose(case.spacing, (2.0, 2.5, 3.0))
    assert case.meta["orientation"] == "LPS"
    # the window maps -57..164 HU onto 0..1 with clipping: independent check on the voxel values
    expected = np.clip((image - -57.0) / (164.0 - -57.0), 0, 1)
    assert case.image.min() >= 0 and case.image.max() <= 1
    assert abs(float(case.image.mean()) - float(expected.mean())) < 0.05
    bad = JobSpec.from_dict({"job": {"name": "b"}, "cohort": {"manifest": str(tmp_path / "m.csv")},
                             "model": {"kind": "bundle", "path": str(root)},
                             "preprocess": {"spacing": [1.0, 1.0, 1.0]}}, base_dir=tmp_path)
    with pytest.raises(JobSpecError, match="contradicts bundle"):
        PatientProcessor(bad)
