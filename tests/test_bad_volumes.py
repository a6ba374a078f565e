"""Files that read as images but cannot mean a 3D scan fail their own patient with a reason to act on.

Each header is written field by field (nibabel repairs some fields when it saves an image), then
the patient goes through ``PatientProcessor.process``, the path every worker runs: the outcome is a
per-patient ``Failure`` whose one-line reason names the patient, the file, what is wrong and what to do.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from engine.jobs import JobSpec
from engine.pipeline import Failure, PatientProcessor
from engine.store import PatientResult

IDENTITY = ((7.0, 0, 0, 0), (0, 7.0, 0, 0), (0, 0, 7.0, 0))


def raw_nifti(path: Path, shape=(48, 40, 40), *, srows=IDENTITY, pixdim=(7.0, 7.0, 7.0), sform_code=1) -> Path:
    """An uncompressed NIfTI-1 file with exactly these header fields (qform off)."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(np.int16)
    hdr["srow_x"], hdr["srow_y"], hdr["srow_z"] = srows
    hdr["sform_code"], hdr["qform_code"] = sform_code, 0
    hdr["pixdim"][1:4] = pixdim
    hdr["vox_offset"] = 352
    data = np.full(shape, -1000, dtype=np.int16)
    with open(path, "wb") as fh:
        hdr.write_to(fh)
        fh.write(b"\0" * (352 - fh.tell()))
        fh.write(data.tobytes(order="F"))
    return path


CASES = {
    "singular": (dict(srows=((0, 0, 0, 0),) * 3, pixdim=(0, 0, 0)), "affine is singular"),
    "coinciding_axes": (dict(srows=((7, 7, 0, 0), (0, 0, 0, 0), (0, 0, 7, 0))), "affine is singular"),
    "nan_affine": (dict(srows=((np.nan, 0, 0, 0), (0, 7, 0, 0), (0, 0, 7, 0))), "contains NaN or infinite values"),
    "inf_affine": (dict(srows=((7, 0, 0, np.inf), (0, 7, 0, 0), (0, 0, 7, 0))), "contains NaN or infinite values"),
    "zero_pixdim": (dict(sform_code=0, pixdim=(0.0, 7.0, 7.0)), "pixdim) [0.0, 7.0, 7.0] is zero, negative"),
    "negative_pixdim": (dict(sform_code=0, pixdim=(-7.0, 7.0, 7.0)), "pixdim) [-7.0, 7.0, 7.0] is zero, negative"),
    "tiny_spacing": (dict(srows=((1e-5, 0, 0, 0), (0, 7, 0, 0), (0, 0, 7, 0))), "voxel size [1e-05, 7.0, 7.0] mm is outside"),
    "huge_spacing": (dict(srows=((7000, 0, 0, 0), (0, 7, 0, 0), (0, 0, 7, 0))), "voxel size [7000.0, 7.0, 7.0] mm is outside"),
    "four_d": (dict(shape=(48, 40, 40, 2)), "is a 4D volume (48, 40, 40, 2); pass one 3D volume per patient"),
    "absurd_size": (dict(shape=(9000, 2, 2)), "9000 x 2 x 2 voxels"),
}


@pytest.fixture(scope="module")
def processor(tmp_path_factory: pytest.TempPathFactory) -> PatientProcessor:
    base = tmp_path_factory.mktemp("job")
    spec = JobSpec.from_dict({"job": {"name": "bad-volumes"}, "cohort": {"phantoms": 1}, "model": {"kind": "demo"},
                              "attribution": {"method": "saliency", "targets": ["aorta"]}}, base_dir=base)
    return PatientProcessor(spec)


@pytest.mark.parametrize("kind", sorted(CASES))
def test_a_header_that_means_no_scan_fails_its_patient_with_a_reason(tmp_path, processor, kind) -> None:
    header, reason = CASES[kind]
    path = raw_nifti(tmp_path / f"{kind}.nii", **header)
    outcome = processor.process({"patient_id": kind, "image_path": str(path)})
    assert isinstance(outcome, Failure), f"{kind} was explained as if it were a scan"
    assert reason in outcome.error
    assert outcome.error.startswith(f"patient {kind}: image {path}: ") and "\n" not in outcome.error


def test_the_same_writer_makes_a_scan_that_is_explained(tmp_path, processor) -> None:
    path = raw_nifti(tmp_path / "fine.nii")
    assert isinstance(processor.process({"patient_id": "fine", "image_path": str(path)}), PatientResult)


def test_a_label_map_with_a_singular_affine_fails_too(tmp_path, processor) -> None:
    image = raw_nifti(tmp_path / "image.nii")
    label = raw_nifti(tmp_path / "label.nii", srows=((0, 0, 0, 0),) * 3)
    outcome = processor.process({"patient_id": "lab", "image_path": str(image), "label_path": str(label)})
    assert isinstance(outcome, Failure) and f"label map {label}: affine is singular" in outcome.error
