"""Tests for the input side: volumes (reading, validation, preprocessing), cohorts (manifests, scans), RoI sets."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import polars as pl
import pytest
import torch

from tests._data import totalseg_dir
from engine.errors import JobSpecError, VolumeError
from engine.aggregate import RoISet
from engine.cohorts import read_manifest, scan_cohort
from engine.rois import RoISpec, build_rois, rois_from_label_map, rois_from_prediction
from engine.volumes import PreprocessSpec, load_case, resample_to_source
from engine.labels import JOINED_ROIS, THORAX_CLASSES, totalsegmentator_to_thorax


def _codes(affine: np.ndarray) -> str:
    return "".join(nib.aff2axcodes(affine))


def _write(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return path


@pytest.fixture(scope="module")
def data() -> Path:
    return totalseg_dir()


# --------------------------------------------------------------------------- loading


def test_nifti_loads_ras_with_requested_spacing(data: Path) -> None:
    case = load_case(
        {"patient_id": "p1", "image_path": data / "example_ct_sm.nii.gz", "label_path": data / "example_seg.nii.gz"},
        preprocess=PreprocessSpec(spacing=(4.0, 4.0, 4.0)),
    )
    assert _codes(case.affine) == "RAS"
    np.testing.assert_allclose(case.spacing, (4.0, 4.0, 4.0), atol=1e-5)
    assert case.image.dtype == torch.float32 and case.image.ndim == 4 and case.image.shape[0] == 1
    assert 0.0 <= float(case.image.min()) and float(case.image.max()) <= 1.0
    assert case.label is not None and case.label.dtype == torch.int64
    assert tuple(case.label.shape) == case.shape
    assert case.source_shape == (122, 101, 30)
    assert int(case.label.max()) > 1 and case.rois == {}


def test_dicom_series_loads_ras_and_agrees_with_its_segmentation(data: Path) -> None:
    spec = PreprocessSpec(spacing=(2.0, 2.0, 2.0))
    case = load_case(
        {"patient_id": "d1", "image_path": data / "example_ct_dicom", "label_path": data / "example_seg_dicom.nii.gz"},
        preprocess=spec,
    )
    assert _codes(case.affine) == "RAS"
    np.testing.assert_allclose(case.spacing, (2.0, 2.0, 2.0), atol=1e-5)
    assert case.source_shape == (512, 512, 20)
    assert case.meta["source_orientation"] != "RAS"  # DICOM (LPS) needed reorienting

    # the segmentation (LAS NIfTI) alone lands on the same grid as the DICOM series
    seg_case = load_case({"patient_id": "s", "image_path": data / "example_seg_dicom.nii.gz"}, preprocess=spec)
    assert seg_case.shape == case.shape
    np.testing.assert_allclose(seg_case.affine, case.affine, atol=1e-3)

    # and the structures lie inside the body (orientation really agrees, not just the affine)
    assert case.label is not None
    body = case.image[0] > 0.3  # about -400 HU
    inside = body[case.label > 0].float().mean()
    assert inside > 0.9
    flipped = body.flip(1)[case.label > 0].float().mean()
    assert flipped < inside


def test_lps_flipped_copy_loads_identical(data: Path, tmp_path: Path) -> None:
    img = nib.load(str(data / "example_ct_sm.nii.gz"))
    arr = np.asarray(img.dataobj)
    aff = img.affine.copy()
    flip = np.eye(4)
    for ax in (0, 1):  # flip i and j: RAS -> LPS, same physical space
        flip[ax, ax] = -1
        flip[ax, 3] = arr.shape[ax] - 1
    lps_aff = aff @ flip
    path = _write(tmp_path / "lps.nii.gz", np.ascontiguousarray(arr[::-1, ::-1, :]), lps_aff)
    assert _codes(lps_aff) == "LPS"
    spec = PreprocessSpec()
    a = load_case({"patient_id": "a", "image_path": data / "example_ct_sm.nii.gz"}, preprocess=spec)
    b = load_case({"patient_id": "b", "image_path": path}, preprocess=spec)
    assert torch.equal(a.image, b.image)
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-5)


def test_resample_to_source_round_trip(data: Path, tmp_path: Path) -> None:
    seg = nib.load(str(data / "example_seg.nii.gz"))
    seg_arr = np.asarray(seg.dataobj).astype(np.int64)
    # LPS copy of image and label, preprocessed with orientation and a finer spacing
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[0, 3], flip[1, 3] = seg_arr.shape[0] - 1, seg_arr.shape[1] - 1
    ct = nib.load(str(data / "example_ct_sm.nii.gz"))
    img_p = _write(tmp_path / "ct.nii.gz", np.ascontiguousarray(np.asarray(ct.dataobj)[::-1, ::-1]), ct.affine @ flip)
    lab_arr = np.ascontiguousarray(seg_arr[::-1, ::-1].astype(np.uint8))
    lab_p = _write(tmp_path / "seg.nii.gz", lab_arr, seg.affine @ flip)
    case = load_case({"patient_id": "r", "image_path": img_p, "label_path": lab_p},
                     preprocess=PreprocessSpec(spacing=(1.5, 1.5, 1.5)))
    assert case.label is not None
    back = resample_to_source(case.label, case)
    assert back.shape == lab_arr.shape
    np.testing.assert_array_equal(back, lab_arr)
    np.testing.assert_allclose(case.source_affine, seg.affine @ flip, atol=1e-4)
    # float maps with a channel axis keep it
    fmap = resample_to_source(case.image, case)
    assert fmap.shape == (1, *lab_arr.shape) and fmap.dtype == np.float32


def test_preprocess_crop_and_pad(data: Path) -> None:
    spec = PreprocessSpec(spacing=(6.0, 6.0, 6.0), crop_foreground=True, pad_to=(48, 48, 48))
    case = load_case({"patient_id": "c", "image_path": data / "example_ct_sm.nii.gz",
                      "label_path": data / "example_seg.nii.gz"}, preprocess=spec)
    assert all(s >= 48 for s in case.shape)
    assert case.label is not None and tuple(case.label.shape) == case.shape


def test_custom_roi_masks_follow_the_image(data: Path, tmp_path: Path) -> None:
    seg = nib.load(str(data / "example_seg.nii.gz"))
    mask = (np.asarray(seg.dataobj) > 0).astype(np.uint8)
    p = _write(tmp_path / "m.nii.gz", mask, seg.affine)
    case = load_case({"patient_id": "m", "image_path": data / "example_ct_sm.nii.gz", "roi_body": p},
                     preprocess=PreprocessSpec(spacing=(4.0, 4.0, 4.0)), roi_masks={"organs": str(p)})
    assert set(case.rois) == {"body", "organs"}
    assert tuple(case.rois["body"].shape) == case.shape and case.rois["body"].dtype == torch.int64
    assert set(case.rois["body"].unique().tolist()) == {0, 1}


# --------------------------------------------------------------------------- bad inputs


def _expect(match: str, record: dict, **kw) -> VolumeError:
    with pytest.raises(VolumeError, match=match) as info:
        load_case(record, preprocess=PreprocessSpec(), **kw)
    return info.value


def test_missing_path(tmp_path: Path) -> None:
    err = _expect("does not exist", {"patient_id": "x1", "image_path": tmp_path / "nope.nii.gz"})
    assert "x1" in str(err) and "manifest" in str(err)


def test_truncated_nifti(data: Path, tmp_path: Path) -> None:
    raw = (data / "example_ct_sm.nii.gz").read_bytes()
    p = tmp_path / "trunc.nii.gz"
    p.write_bytes(raw[: len(raw) // 2])
    err = _expect("truncated or corrupt", {"patient_id": "x2", "image_path": p})
    assert str(p) in str(err)


def test_text_file_named_nifti(tmp_path: Path) -> None:
    p = tmp_path / "notes.nii.gz"
    p.write_text("this is not an image\n")
    _expect("not a NIfTI image", {"patient_id": "x3", "image_path": p})


@pytest.mark.parametrize("shape", [(32, 32), (32, 32, 1)])
def test_2d_image(tmp_path: Path, shape: tuple[int, ...]) -> None:
    p = _write(tmp_path / "flat.nii.gz", np.zeros(shape, dtype=np.int16))
    _expect("not a 3D volume", {"patient_id": "x4", "image_path": p})


def test_nan_volume(tmp_path: Path) -> None:
    arr = np.zeros((8, 8, 8), dtype=np.float32)
    arr[1, 2, 3] = np.nan
    arr[2, 2, 2] = np.inf
    p = _write(tmp_path / "nan.nii.gz", arr)
    _expect("2 NaN or infinite", {"patient_id": "x5", "image_path": p})


def test_label_shape_mismatch(tmp_path: Path) -> None:
    img = _write(tmp_path / "img.nii.gz", np.zeros((8, 8, 8), dtype=np.int16))
    lab = _write(tmp_path / "lab.nii.gz", np.zeros((8, 8, 9), dtype=np.uint8))
    err = _expect(r"has shape \(8, 8, 9\) but its image", {"patient_id": "x6", "image_path": img, "label_path": lab})
    assert "label map" in str(err)


def test_label_not_integer(tmp_path: Path) -> None:
    img = _write(tmp_path / "img.nii.gz", np.zeros((8, 8, 8), dtype=np.int16))
    lab = _write(tmp_path / "prob.nii.gz", np.full((8, 8, 8), 0.5, dtype=np.float32))
    _expect("integer label ids", {"patient_id": "x7", "image_path": img, "label_path": lab})


def test_dicom_folder_with_several_series_or_none(data: Path, tmp_path: Path) -> None:
    import pydicom

    folder = tmp_path / "two"
    folder.mkdir()
    files = sorted((data / "example_ct_dicom").iterdir())[:6]
    for i, f in enumerate(files):
        ds = pydicom.dcmread(f)
        if i >= 3:
            ds.SeriesInstanceUID = "1.2.3.4.5"
        ds.save_as(folder / f.name)
    err = _expect("holds 2 DICOM series", {"patient_id": "x8", "image_path": folder})
    assert "1.2.3.4.5" in str(err) and "series_uid" in str(err)
    case = load_case({"patient_id": "x8", "image_path": folder, "series_uid": "1.2.3.4.5"},
                     preprocess=PreprocessSpec())
    assert case.source_shape == (512, 512, 3)

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("nothing here")
    _expect("no DICOM image files", {"patient_id": "x9", "image_path": empty})


# --------------------------------------------------------------------------- specs


def test_preprocess_spec_from_dict() -> None:
    spec = PreprocessSpec.from_dict({"spacing": 1.5, "pad_to": [96, 96, 96], "orientation": "ras"})
    assert spec.spacing == (1.5, 1.5, 1.5) and spec.pad_to == (96, 96, 96) and spec.orientation == "RAS"
    assert PreprocessSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(JobSpecError, match="spacingg.*did you mean 'spacing'"):
        PreprocessSpec.from_dict({"spacingg": 1.0})
    with pytest.raises(JobSpecError, match="spacing"):
        PreprocessSpec.from_dict({"spacing": [1, 2]})
    with pytest.raises(JobSpecError, match="orientation"):
        PreprocessSpec.from_dict({"orientation": "RRS"})
    with pytest.raises(JobSpecError, match="interpolation"):
        PreprocessSpec.from_dict({"interpolation": "cubic-ish"})


# --------------------------------------------------------------------------- manifests


def test_read_manifest_resolves_relative_paths(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    m = tmp_path / "sub" / "cohort.csv"
    m.write_text("patient_id,image_path,label_path,roi_tumour,age\n"
                 "a,img/a.nii.gz,,/abs/t.nii.gz,61\n"
                 "b,/data/b.nii.gz,lab/b.nii.gz,,70\n")
    df = read_manifest(m)
    rows = {r["patient_id"]: r for r in df.iter_rows(named=True)}
    assert rows["a"]["image_path"] == str(tmp_path / "sub" / "img" / "a.nii.gz")
    assert rows["a"]["label_path"] is None and rows["a"]["roi_tumour"] == "/abs/t.nii.gz"
    assert rows["b"]["label_path"] == str(tmp_path / "sub" / "lab" / "b.nii.gz")
    assert rows["b"]["age"] == "70"  # extra columns kept

    pq = tmp_path / "cohort.parquet"
    pl.DataFrame({"patient_id": ["a"], "image_path": ["x.nii.gz"]}).write_parquet(pq)
    df = read_manifest(pq)
    assert df["image_path"][0] == str(tmp_path / "x.nii.gz") and df["label_path"][0] is None


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("patient_id,image\na,x.nii.gz\n", "lacks column.*image_path"),
        ("patient_id,image_path\n", "no patients"),
        ("patient_id,image_path\na,x.nii.gz\nb,y.nii.gz\na,z.nii.gz\n", r"duplicate.*'a' on lines 2, 4"),
        ("patient_id,image_path\na,\n", "image_path is empty on line"),
        ("patient_id,image_path,roi_\na,x,y\n", "need a name after 'roi_'"),
    ],
)
def test_read_manifest_errors(tmp_path: Path, text: str, match: str) -> None:
    m = tmp_path / "m.csv"
    m.write_text(text)
    with pytest.raises(JobSpecError, match=match):
        read_manifest(m)


def test_read_manifest_missing_file(tmp_path: Path) -> None:
    with pytest.raises(JobSpecError, match="does not exist"):
        read_manifest(tmp_path / "none.csv")


# --------------------------------------------------------------------------- cohort scan


def test_scan_cohort_shared_data(data: Path) -> None:
    manifest, skipped = scan_cohort(data)
    rows = {r["patient_id"]: r for r in manifest.iter_rows(named=True)}
    assert set(rows) == {"example_ct", "example_ct_sm", "example_ct_dicom"}
    assert rows["example_ct_sm"]["label_path"] == str(data / "example_seg.nii.gz")
    assert rows["example_ct_dicom"]["format"] == "dicom"
    assert rows["example_ct_dicom"]["label_path"] == str(data / "example_seg_dicom.nii.gz")
    reasons = dict(skipped)
    assert "not a NIfTI or DICOM file" in reasons[str(data / "classes_total.json")]


def test_scan_cohort_reports_skips(data: Path, tmp_path: Path) -> None:
    import pydicom

    mr = tmp_path / "patient1" / "mr"
    mr.mkdir(parents=True)
    for f in sorted((data / "example_ct_dicom").iterdir())[:2]:
        ds = pydicom.dcmread(f)
        ds.Modality = "MR"
        ds.save_as(mr / f.name)
    (tmp_path / "broken.nii.gz").write_bytes(b"\x1f\x8bnot really")
    _write(tmp_path / "slice.nii.gz", np.zeros((16, 16, 1), dtype=np.int16))
    _write(tmp_path / "case7.nii.gz", np.zeros((16, 16, 8), dtype=np.int16))
    manifest, skipped = scan_cohort(tmp_path)
    assert manifest["patient_id"].to_list() == ["case7"]
    reasons = dict(skipped)
    assert "not a CT series (Modality MR" in reasons[str(mr)]
    assert "unreadable NIfTI" in reasons[str(tmp_path / "broken.nii.gz")]
    assert "not a 3D volume" in reasons[str(tmp_path / "slice.nii.gz")]
    with pytest.raises(VolumeError, match="does not exist"):
        scan_cohort(tmp_path / "missing")


# --------------------------------------------------------------------------- RoIs


def test_totalsegmentator_label_map_to_thorax_rois(data: Path) -> None:
    ts = {int(k): v for k, v in json.loads((data / "classes_total.json").read_text()).items()}
    seg = torch.as_tensor(np.asarray(nib.load(str(data / "example_seg.nii.gz")).dataobj).astype(np.int64))
    rois = rois_from_label_map(seg, totalsegmentator_to_thorax(ts), names=THORAX_CLASSES)
    labels, names = rois.labels, rois.names
    assert names == THORAX_CLASSES and labels.shape == seg.shape
    lobe_ids = [k for k, v in ts.items() if v == "lung_upper_lobe_left"]
    assert torch.equal(labels == names.index("lung_upper_lobe_left"), torch.isin(seg, torch.tensor(lobe_ids)))
    rib_ids = [k for k, v in ts.items() if v.startswith("rib_")]
    assert torch.equal(labels == names.index("ribs"), torch.isin(seg, torch.tensor(rib_ids)))
    liver = [k for k, v in ts.items() if v == "liver"][0]
    assert bool((labels[seg == liver] == 0).all())  # not a thorax class: background

    assert any((labels == names.index(lobe)).any() for lobe in JOINED_ROIS["lung"])


def test_build_rois_from_spec(data: Path) -> None:
    case = load_case({"patient_id": "r", "image_path": data / "example_ct_sm.nii.gz",
                      "label_path": data / "example_seg.nii.gz"}, preprocess=PreprocessSpec())
    spec = RoISpec.from_dict({"source": "label", "label_names": "classes_total.json",
                              "preset": "totalsegmentator_thorax", "joined": ["lung", "bones"]}, base_dir=data)
    rois = build_rois(spec, case=case, class_names=THORAX_CLASSES)
    assert isinstance(rois, RoISet) and rois.names == THORAX_CLASSES and tuple(rois.labels.shape) == case.shape
    assert rois.joined == {"lung": JOINED_ROIS["lung"], "bones": JOINED_ROIS["bones"]}

    logits = torch.randn(3, 4, 5, 6)
    pred = build_rois(RoISpec(joined={"ab": ["a", "b"]}), case=case, class_names=("bg", "a", "b"), prediction=logits)
    assert torch.equal(pred.labels, logits.argmax(0)) and pred.names == ("bg", "a", "b")
    assert pred.joined == {"ab": ("a", "b")}
    assert rois_from_prediction(logits, ("bg", "a", "b")).names == ("bg", "a", "b")
    with pytest.raises(JobSpecError, match="joined RoI 'ac': part"):
        build_rois(RoISpec(joined={"ac": ["a", "c"]}), case=case, class_names=("bg", "a", "b"), prediction=logits)

    with pytest.raises(VolumeError, match="has no RoI mask column roi_tumour"):
        build_rois(RoISpec(source="tumour"), case=case, class_names=THORAX_CLASSES)
    with pytest.raises(JobSpecError, match="joined RoI"):
        RoISpec(joined=("lungs",))
    with pytest.raises(JobSpecError, match="unknown key"):
        RoISpec.from_dict({"sources": "label"})

