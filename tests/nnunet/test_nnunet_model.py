"""nnU-Net model folders: loading through nnU-Net's classes, safe checkpoints, preprocessing from the plans."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

pytest.importorskip("nnunetv2", reason="nnU-Net v2 is the optional extra nnunet: pip install -c constraints.txt -e '.[nnunet]'")

from engine import io  # noqa: E402
from engine.errors import JobSpecError, ModelError  # noqa: E402
from engine.models import ModelSpec, effective_preprocess, effective_windows, load_model, validate_model  # noqa: E402
from tests.nnunet._folders import INTENSITY, write_folder  # noqa: E402

LABELS = {"background": 0, "liver": 1, "spleen": 2}


class Opaque:  # a class a checkpoint may reference: nothing a restricted unpickler rebuilds
    pass


def test_a_folder_loads_with_its_classes_patch_and_nnunets_windows(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "m", LABELS, folds=(0, 2))
    loaded = load_model(ModelSpec.from_dict({"kind": "nnunet", "path": "m"}, base_dir=tmp_path))
    assert loaded.class_names == ("background", "liver", "spleen")
    assert loaded.roi_size == (16, 12, 8) and loaded.in_channels == 1
    assert loaded.blend == "nnunet" and loaded.overlap == 0.5
    assert len(loaded.module.folds) == 2 and loaded.module.mirror_axes is None
    assert validate_model(loaded) == (1, 3, 16, 12, 8)
    # the weights are the checkpoint's (read independently with a full unpickle here, in the test)
    ck = torch.load(root / "fold_2" / "checkpoint_final.pth", weights_only=False)
    for k, v in loaded.module.folds[1].state_dict().items():
        assert torch.equal(v, ck["network_weights"][k])
    mirrored = load_model(ModelSpec(kind="nnunet", path=str(root), mirroring=True, folds=[0]))
    assert mirrored.module.mirror_axes == (0, 1, 2) and len(mirrored.module.folds) == 1


def test_a_nomirroring_trainer_is_not_mirrored_even_when_asked(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "m", LABELS, mirror_axes=None, trainer="nnUNetTrainerNoMirroring")
    assert load_model(ModelSpec(kind="nnunet", path=str(root), mirroring=True)).module.mirror_axes is None


def test_a_checkpoint_with_foreign_objects_needs_trust_and_says_why(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "m", LABELS, extra_checkpoint={"callback": Opaque()})
    with pytest.raises(ModelError, match=r"unpickle arbitrary objects.*trust_checkpoint = true"):
        load_model(ModelSpec(kind="nnunet", path=str(root)))
    loaded = load_model(ModelSpec(kind="nnunet", path=str(root), trust_checkpoint=True))
    assert loaded.n_classes == 3


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: (r / "plans.json").unlink(), "plans.json not found"),
        (lambda r: (r / "fold_0" / "checkpoint_final.pth").unlink(), "no fold_N/checkpoint_final.pth"),
        (lambda r: (r / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"},
                                                               "labels": {"background": 0, "liver": 2}})),
         "do not number"),
    ],
)
def test_broken_folders_are_refused_with_what_to_do(tmp_path: Path, change, message) -> None:
    root = write_folder(tmp_path / "m", LABELS)
    change(root)
    with pytest.raises(ModelError, match=message):
        load_model(ModelSpec(kind="nnunet", path=str(root)))


def test_spec_errors_name_the_key() -> None:
    with pytest.raises(JobSpecError, match="needs path"):
        ModelSpec(kind="nnunet")
    with pytest.raises(JobSpecError, match="tile_step_size"):
        ModelSpec(kind="nnunet", path="x", tile_step_size=0)
    with pytest.raises(JobSpecError, match="remove roi_size"):
        ModelSpec(kind="nnunet", path="x", roi_size=(8, 8, 8))


def test_job_settings_that_would_be_ignored_are_refused(tmp_path: Path) -> None:
    from engine.jobs import AttributionSpec

    loaded = load_model(ModelSpec(kind="nnunet", path=str(write_folder(tmp_path / "m", LABELS))))
    assert effective_windows(loaded, AttributionSpec()) == ("nnunet", 0.5)
    with pytest.raises(JobSpecError, match="tile_step_size"):
        effective_windows(loaded, AttributionSpec(blend="gaussian"))
    with pytest.raises(JobSpecError, match="remove the \\[preprocess\\] table"):
        effective_preprocess(loaded, {"spacing": [1, 1, 1]})


def _ct(path: Path, data: np.ndarray, affine: np.ndarray) -> str:
    nib.save(nib.Nifti1Image(data.astype(np.float32), affine), str(path))
    return str(path)


def test_cases_are_preprocessed_as_nnunets_own_preprocessor_does_from_the_file(tmp_path: Path) -> None:
    """Against nnU-Net's DefaultPreprocessor.run_case reading the file with the plans' NibabelIO."""
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    root = write_folder(tmp_path / "m", LABELS)
    loaded = load_model(ModelSpec(kind="nnunet", path=str(root)))
    rng = np.random.default_rng(0)
    data = rng.uniform(-1000, 1000, size=(22, 17, 13))
    data[:3] = 0  # a zero border that nnU-Net crops away
    affine = np.array([[-1.5, 0, 0, 10], [0, 1.0, 0, -5], [0, 0, 2.0, 3], [0, 0, 0, 1]])
    path = _ct(tmp_path / "ct.nii.gz", data, affine)
    case = loaded.case_loader({"patient_id": "p", "image_path": path})
    plans = json.loads((root / "plans.json").read_text())
    pm = PlansManager(plans)
    expected, _, _ = DefaultPreprocessor(verbose=False).run_case(
        [path], None, pm, pm.get_configuration("3d_fullres"), json.loads((root / "dataset.json").read_text()))
    assert tuple(case.image.shape) == expected.shape
    np.testing.assert_allclose(case.image.numpy(), expected, rtol=1e-5, atol=1e-5)
    # the model grid keeps nnU-Net's axis order, at the plans' spacing up to nnU-Net's rounding of the new shape
    # (it keeps the field of view: spacing = old spacing · old size / new size)
    assert case.spacing == pytest.approx((3.0, 2.0, 2.5), rel=0.2)


def test_the_model_grid_sits_where_the_source_is_in_space(tmp_path: Path) -> None:
    """A linear ramp in world coordinates survives nnU-Net's preprocessing at the grid's world positions."""
    root = write_folder(tmp_path / "m", LABELS)
    loaded = load_model(ModelSpec(kind="nnunet", path=str(root)))
    affine = np.array([[0, 0, 2.0, -20], [1.5, 0, 0, 7], [0, -1.25, 0, 4], [0, 0, 0, 1]])  # permuted, flipped axes
    shape = (30, 26, 21)
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).reshape(-1, 3)
    world = idx @ affine[:3, :3].T + affine[:3, 3]
    ramp = lambda w: 100.0 + 4.0 * w[:, 0] - 3.0 * w[:, 1] + 2.0 * w[:, 2]  # noqa: E731
    path = _ct(tmp_path / "ramp.nii.gz", ramp(world).reshape(shape), affine)
    label = np.zeros(shape, np.int16)
    label[8:20, 5:15, 6:16] = 2
    nib.save(nib.Nifti1Image(label, affine), str(tmp_path / "lab.nii.gz"))
    case = loaded.case_loader({"patient_id": "p", "image_path": path, "label_path": str(tmp_path / "lab.nii.gz")})
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in case.shape], indexing="ij"), -1).reshape(-1, 3)
    w = grid @ case.affine[:3, :3].T + case.affine[:3, 3]
    hu = case.image[0].numpy().reshape(-1) * INTENSITY["std"] + INTENSITY["mean"]
    inner = np.all([(grid[:, d] > 2) & (grid[:, d] < case.shape[d] - 3) for d in range(3)], axis=0)
    np.testing.assert_allclose(hu[inner], np.clip(ramp(w), INTENSITY["percentile_00_5"],
                                                  INTENSITY["percentile_99_5"])[inner], atol=0.5)
    # the label keeps its place: its world centroid moves by less than a model voxel
    src_c = (np.argwhere(label == 2) @ affine[:3, :3].T + affine[:3, 3]).mean(0)
    got = np.argwhere(case.label.numpy() == 2)
    got_c = (got @ case.affine[:3, :3].T + case.affine[:3, 3]).mean(0)
    assert np.abs(src_c - got_c).max() < max(case.spacing)
    # and maps go back onto the source grid: the preprocessed image returns to the clipped ramp
    back = io.resample_to_source(case.image[0], case) * INTENSITY["std"] + INTENSITY["mean"]
    src_inner = np.all([(idx[:, d] > 3) & (idx[:, d] < shape[d] - 4) for d in range(3)], axis=0)
    np.testing.assert_allclose(back.reshape(-1)[src_inner], np.clip(ramp(world), -900, 800)[src_inner], atol=1.0)
