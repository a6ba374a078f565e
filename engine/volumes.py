"""Reading CT volumes, label maps and RoI masks, and putting them on the model grid.

Every patient goes through :func:`load_case`, which reads a NIfTI file or a DICOM series
with MONAI readers, checks that what it read is a usable 3D volume (errors are
``VolumeError`` naming the patient, the file, what is wrong and what to do: a header whose
affine places no voxel in space, voxel sizes no scanner makes, 4D or absurdly large volumes,
NaN voxels ...), and puts the image, its label map and any custom RoI masks on the model grid
with the same MONAI spatial transforms (orientation, spacing, foreground crop, padding).  The
model grid can be mapped back onto the original CT with :func:`resample_to_source`, so that
maps saved for 3D Slicer overlay the scan.

Where patients come from is :mod:`engine.cohorts`; which regions their attributions are
aggregated over is :mod:`engine.rois`.
"""

from __future__ import annotations

import gzip
import logging
import re
import warnings
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.errors import JobSpecError, VolumeError
from engine.settings import parse, section

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")



# --------------------------------------------------------------------------- preprocessing


def _positive3(value: Any, *, what: str) -> tuple:
    out = (value,) * 3 if isinstance(value, (int, float)) else tuple(value)
    if len(out) != 3 or any(v <= 0 for v in out):
        raise JobSpecError(f"[preprocess] {what} must be 3 positive numbers, got {value!r}")
    return out


@section("preprocess")
class PreprocessSpec:
    """How volumes are put on the model grid; the same spec must be used for every patient.

    ``interpolation`` applies to the image only: label maps and RoI masks are always
    resampled with nearest neighbour so that their ids survive.  Intensities are windowed
    from ``[a_min, a_max]`` HU to ``[b_min, b_max]`` (clipped when ``clip``).
    ``crop_foreground`` crops all volumes to the bounding box of image voxels > ``b_min``;
    ``pad_to`` pads (never crops) so that each dimension is at least the sliding window.
    ``spacing`` and ``pad_to`` take one number for all three axes or a list of three.
    """

    orientation: str | None = "RAS"
    spacing: tuple[float, float, float] | float | None = None
    interpolation: str = "bilinear"
    a_min: float = -1024.0
    a_max: float = 1024.0
    b_min: float = 0.0
    b_max: float = 1.0
    clip: bool = True
    crop_foreground: bool = False
    pad_to: tuple[int, int, int] | int | None = None

    def __post_init__(self) -> None:
        if self.orientation is not None:
            codes = self.orientation.upper()
            if len(codes) != 3 or not all(c in "RLAPSI" for c in codes) or len({_axis_of(c) for c in codes}) != 3:
                raise JobSpecError(
                    f"[preprocess] orientation {self.orientation!r} is not three axis codes "
                    "(one of R/L, A/P, S/I each), e.g. 'RAS'"
                )
            object.__setattr__(self, "orientation", codes)
        if self.spacing is not None:
            object.__setattr__(self, "spacing", tuple(float(v) for v in _positive3(self.spacing, what="spacing")))
        if self.pad_to is not None:
            object.__setattr__(self, "pad_to", _positive3(self.pad_to, what="pad_to"))
        allowed = ("nearest", "bilinear", "trilinear", "bicubic")
        if self.interpolation not in allowed:
            raise JobSpecError(
                f"[preprocess] interpolation {self.interpolation!r} is not one of {', '.join(allowed)}"
            )
        if self.interpolation == "trilinear":  # MONAI's Spacing calls it bilinear in 3D
            object.__setattr__(self, "interpolation", "bilinear")
        if not self.a_max > self.a_min:
            raise JobSpecError(f"[preprocess] a_max ({self.a_max}) must be greater than a_min ({self.a_min})")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | PreprocessSpec | None) -> PreprocessSpec:
        """From a job-spec table (or a spec); unknown keys and wrong types are a ``JobSpecError``."""
        return d if isinstance(d, PreprocessSpec) else parse(cls, d)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (lists for tuples), suitable for TOML/JSON and for ``from_dict``."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


def _axis_of(code: str) -> int:
    return {"R": 0, "L": 0, "A": 1, "P": 1, "S": 2, "I": 2}[code]


# --------------------------------------------------------------------------- cases


@dataclass
class Case:
    """One patient on the model grid.

    ``image`` is float32 ``(C, X, Y, Z)``; ``label`` int64 ``(X, Y, Z)`` or None; ``rois``
    maps custom RoI names to int64 label maps on the same grid.  ``affine`` is the model
    grid's voxel -> RAS mm matrix; ``source_affine``/``source_shape`` describe the original
    image grid (RAS, as nibabel writes it), for :func:`resample_to_source`.
    """

    patient_id: str
    image: torch.Tensor
    label: torch.Tensor | None
    rois: dict[str, torch.Tensor]
    affine: np.ndarray
    source_affine: np.ndarray
    source_shape: tuple[int, int, int]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size of the model grid in mm."""
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    @property
    def shape(self) -> tuple[int, int, int]:
        """Spatial shape of the model grid."""
        return tuple(int(s) for s in self.image.shape[1:])  # type: ignore[return-value]


def has_value(value: Any) -> bool:
    """A manifest cell that holds something (not None, NaN or blank)."""
    return value is not None and not (isinstance(value, float) and np.isnan(value)) and str(value).strip() != ""


class _Fail:
    """Builds per-case VolumeErrors: 'patient P: <role> <path>: <what>; <todo>'."""

    def __init__(self, patient_id: str) -> None:
        self.patient_id = patient_id

    def __call__(self, role: str, path: Any, what: str, todo: str) -> VolumeError:
        return VolumeError(f"patient {self.patient_id}: {role} {path}: {what}; {todo}")


def _dicom_series(folder: Path) -> dict[str, list[tuple[Path, Any]]]:
    """DICOM image files directly in ``folder``, grouped by SeriesInstanceUID (headers only)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    groups: dict[str, list[tuple[Path, Any]]] = {}
    for f in sorted(folder.iterdir()):
        if not f.is_file():
            continue
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except (InvalidDicomError, OSError, EOFError, ValueError, AttributeError):
            continue
        if "Rows" not in ds:  # no pixel data: SR, RTSTRUCT, DICOMDIR ...
            continue
        groups.setdefault(str(ds.get("SeriesInstanceUID", "unknown")), []).append((f, ds))
    return groups


def _reader_for(path: Path, fail: _Fail, role: str, series_uid: str | None) -> tuple[str, dict[str, Any]]:
    """MONAI reader name and reader kwargs for ``path``; validates DICOM folders."""
    if path.is_dir():
        groups = _dicom_series(path)
        if not groups:
            subdirs = sorted(p.name for p in path.iterdir() if p.is_dir())
            hint = (f" (it has sub-folders {', '.join(subdirs[:5])}: point {role}_path at one series folder,"
                    " or run `agg2exp cohort scan` on it)") if subdirs else ""
            raise fail(role, path, f"folder contains no DICOM image files{hint}",
                       "give a NIfTI file or a folder holding one DICOM series")
        if series_uid:
            if series_uid not in groups:
                raise fail(role, path, f"series {series_uid} is not in this folder (found {', '.join(groups)})",
                           "fix series_uid in the manifest")
            groups = {series_uid: groups[series_uid]}
        if len(groups) > 1:
            desc = "; ".join(
                f"{uid} ({len(items)} files, {items[0][1].get('Modality', '?')} "
                f"'{items[0][1].get('SeriesDescription', '')}')" for uid, items in groups.items()
            )
            raise fail(role, path, f"folder holds {len(groups)} DICOM series: {desc}",
                       "choose one: add a series_uid column to the manifest, or put each series in its own folder")
        files = next(iter(groups.values()))
        regex = "(?:" + "|".join(re.escape(str(f)) for f, _ in files) + r")\Z"
        return "PydicomReader", {"fname_regex": regex}
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        _check_nifti_header(path, fail, role)
        return "NibabelReader", {}
    if name.endswith(".dcm"):
        return "PydicomReader", {}
    raise fail(role, path, "unsupported file type",
               "give a NIfTI file (.nii or .nii.gz) or a folder holding one DICOM series "
               "(convert other formats, e.g. with `SimpleITK` or 3D Slicer, to NIfTI)")


#: Voxel sizes outside this range (mm) are header errors, not scans: no CT has 0.0001 mm or 1 m voxels.
SPACING_RANGE_MM = (1e-3, 100.0)
#: Largest volume read: 2**31 voxels (8 GiB as float32) and 8192 voxels along any axis.
MAX_VOXELS = 2**31
MAX_SIDE = 8192


def _check_nifti_header(path: Path, fail: _Fail, role: str) -> None:
    """Refuse, from the header alone, files that read but cannot mean a 3D scan."""
    import nibabel as nib

    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for bad files
        with open(path, "rb") as fh:
            magic = fh.read(2)
        if magic == b"\x1f\x8b":
            raise fail(role, path, f"gzip file is truncated or corrupt ({exc})",
                       "re-export or re-download the file") from exc
        raise fail(role, path, f"not a NIfTI image ({type(exc).__name__}: {exc})",
                   "check that the path points at the image, not at another file with a .nii name") from exc
    shape = tuple(int(s) for s in img.shape)
    if len(shape) > 3 and int(np.prod(shape[3:])) > 1:
        raise fail(role, path, f"is a {len(shape)}D volume {shape}",
                   "pass one 3D volume per patient (split the series, or select a channel or time point, "
                   "e.g. with nibabel: img.slicer[..., 0])")
    if len(shape) >= 3:
        _check_size(shape[:3], path, fail, role)
    header = img.header
    if hasattr(header, "get_best_affine") and int(header.get("sform_code", 0)) == 0:
        # without an sform the spacing is pixdim, which nibabel silently replaces when <= 0
        with nib.openers.ImageOpener(str(path)) as fh:
            raw = type(header).from_fileobj(fh, check=False)
        pixdim = [float(v) for v in raw["pixdim"][1:4]]
        if not all(np.isfinite(pixdim)) or min(pixdim) <= 0:
            raise fail(role, path, f"header voxel size (pixdim) {pixdim} is zero, negative or not a number",
                       "fix the header's voxel size (e.g. re-export the volume with 3D Slicer or nibabel)")
    _check_geometry(np.asarray(img.affine, dtype=np.float64), path, fail, role)


def _check_size(shape: Sequence[int], path: Any, fail: _Fail, role: str) -> None:
    n = int(np.prod([int(s) for s in shape], dtype=np.float64))
    if max(shape) > MAX_SIDE or n > MAX_VOXELS:
        raise fail(role, path, f"has {' x '.join(map(str, shape))} voxels ({n * 4 / 2**30:.1f} GiB as float32), more "
                   f"than the {MAX_SIDE} per axis / {MAX_VOXELS:.2e} in all a scan can have",
                   "check the header's dimensions, or crop or downsample the volume first")


def _check_geometry(affine: np.ndarray, path: Any, fail: _Fail, role: str) -> None:
    """A voxel -> mm affine that places voxels in space: finite, invertible, plausible voxel sizes."""
    todo = "fix the header's orientation and voxel size (qform/sform), e.g. re-export the volume with 3D Slicer or nibabel"
    if not np.all(np.isfinite(affine)):
        raise fail(role, path, "affine (voxel-to-world matrix) contains NaN or infinite values", todo)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    if np.linalg.matrix_rank(affine[:3, :3] / max(float(spacing.max()), 1e-300), tol=1e-6) < 3:
        raise fail(role, path, f"affine is singular (voxel sizes {np.round(spacing, 6).tolist()} mm or axes that "
                   "coincide): the header does not say where voxels are", todo)
    low, high = SPACING_RANGE_MM
    if spacing.min() < low or spacing.max() > high:
        raise fail(role, path, f"voxel size {np.round(spacing, 6).tolist()} mm is outside [{low}, {high}] mm", todo)


def _load_raw(path_value: Any, *, role: str, fail: _Fail, series_uid: str | None, image: bool) -> Any:
    """LoadImage + EnsureChannelFirst one file; returns a MetaTensor (C, X, Y, Z)."""
    from monai.transforms import EnsureChannelFirst, LoadImage

    path = Path(str(path_value)).expanduser()
    if not path.exists():
        raise fail(role, path, "does not exist", "fix the path in the manifest (relative paths are "
                   "resolved against the manifest's folder)")
    reader, kwargs = _reader_for(path, fail, role, series_uid)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. optional nvImageCodec plugin missing
            loader = LoadImage(reader=reader, image_only=True, dtype=np.float32, **kwargs)
            img = loader(str(path))
            img = EnsureChannelFirst()(img)
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise fail(role, path, f"file is truncated or corrupt ({type(exc).__name__}: {exc})",
                   "re-export or re-download the file") from exc
    except Exception as exc:
        raise fail(role, path, f"could not be read as an image ({type(exc).__name__}: {str(exc).splitlines()[0]})",
                   "check that it is a valid NIfTI file or DICOM series") from exc
    spatial = tuple(int(s) for s in img.shape[1:])
    if len(spatial) != 3 or min(spatial) < 2:
        raise fail(role, path, f"is not a 3D volume (spatial shape {spatial})",
                   "give a 3D CT volume; 2D images and single slices cannot be explained by a 3D model")
    _check_size(spatial, path, fail, role)
    _check_geometry(np.asarray(img.affine, dtype=np.float64), path, fail, role)
    if image and img.shape[0] < 1:
        raise fail(role, path, "has no channels", "give a 3D CT volume")
    if not bool(torch.isfinite(img.as_tensor()).all()):
        n_bad = int((~torch.isfinite(img.as_tensor())).sum())
        raise fail(role, path, f"contains {n_bad} NaN or infinite voxel(s)",
                   "fix or re-export the volume (replace NaN/inf by a valid value)")
    return img


def _as_label(img: Any, *, role: str, path: Any, fail: _Fail) -> Any:
    """Check that a loaded map holds non-negative integer ids (one channel)."""
    if img.shape[0] != 1:
        raise fail(role, path, f"has {img.shape[0]} channels", "give a single-channel integer label map")
    t = img.as_tensor()
    rounded = torch.round(t)
    if bool((t - rounded).abs().max() > 1e-3) or bool((rounded < 0).any()):
        raise fail(role, path, "does not hold non-negative integer label ids (looks like a probability or "
                   "intensity map)", "give an integer label map (0 = background)")
    img.data = rounded  # keep meta, drop float noise
    return img


def same_grid(a: np.ndarray, b: np.ndarray, spacing: Sequence[float]) -> bool:
    tol = 0.1 * float(min(spacing))
    return bool(np.allclose(a[:3, :3], b[:3, :3], atol=1e-3 * max(1.0, float(max(spacing))))
                and np.allclose(a[:3, 3], b[:3, 3], atol=tol))


def _spatial_transforms(spec: PreprocessSpec, image_key: str, label_keys: list[str]) -> list:
    from monai.transforms import CropForegroundd, Orientationd, ScaleIntensityRanged, Spacingd, SpatialPadd

    keys = [image_key, *label_keys]
    out: list = []
    if spec.orientation:
        out.append(Orientationd(keys=keys, axcodes=spec.orientation))
    if spec.spacing:
        out.append(Spacingd(keys=keys, pixdim=spec.spacing,
                            mode=[spec.interpolation] + ["nearest"] * len(label_keys),
                            padding_mode=["border"] + ["zeros"] * len(label_keys),
                            dtype=[np.float32] * len(keys)))
    out.append(ScaleIntensityRanged(keys=image_key, a_min=spec.a_min, a_max=spec.a_max,
                                    b_min=spec.b_min, b_max=spec.b_max, clip=spec.clip))
    if spec.crop_foreground:
        threshold = spec.b_min + 1e-6 * (spec.b_max - spec.b_min)
        out.append(CropForegroundd(keys=keys, source_key=image_key, select_fn=lambda x: x > threshold,
                                   allow_smaller=True))
    if spec.pad_to:
        out.append(SpatialPadd(keys=image_key, spatial_size=spec.pad_to, value=spec.b_min))
        if label_keys:
            out.append(SpatialPadd(keys=label_keys, spatial_size=spec.pad_to, value=0))
    return out


def load_case(
    record: Mapping[str, Any],
    *,
    preprocess: PreprocessSpec,
    roi_masks: Mapping[str, str] | None = None,
) -> Case:
    """Read one patient and put image, label and RoI masks on the model grid.

    ``record`` is a manifest row: ``patient_id``, ``image_path`` (NIfTI file or DICOM series
    folder), optional ``label_path``, ``series_uid`` (to pick one series from a folder) and
    ``roi_<name>`` mask paths; ``roi_masks`` adds or overrides RoI masks by name.  Raises
    ``VolumeError`` naming the patient and file when anything cannot be used.
    """
    from monai.transforms import Compose

    if not has_value(record.get("patient_id")) or not has_value(record.get("image_path")):
        raise VolumeError(f"case record {dict(record)!r} needs patient_id and image_path")
    pid = str(record["patient_id"])
    fail = _Fail(pid)
    series_uid = str(record["series_uid"]) if has_value(record.get("series_uid")) else None

    image = _load_raw(record["image_path"], role="image", fail=fail, series_uid=series_uid, image=True)
    source_affine = np.asarray(image.affine, dtype=np.float64)
    source_shape = tuple(int(s) for s in image.shape[1:])
    src_spacing = tuple(float(v) for v in np.linalg.norm(source_affine[:3, :3], axis=0))

    extra: dict[str, Any] = {}
    if has_value(record.get("label_path")):
        extra["label"] = record["label_path"]
    masks = {k[4:]: v for k, v in record.items() if k.startswith("roi_") and has_value(v)}
    masks.update({k: v for k, v in (roi_masks or {}).items() if has_value(v)})
    for name, p in masks.items():
        extra[f"roi_{name}"] = p

    data: dict[str, Any] = {"image": image}
    for key, p in extra.items():
        role = "label map" if key == "label" else f"RoI mask '{key[4:]}'"
        img = _load_raw(p, role=role, fail=fail, series_uid=None, image=False)
        img = _as_label(img, role=role, path=p, fail=fail)
        shape = tuple(int(s) for s in img.shape[1:])
        if shape != source_shape:
            raise fail(role, p, f"has shape {shape} but its image {record['image_path']} has shape {source_shape}",
                       "give a map on the image's voxel grid (same size and geometry as the CT)")
        if not same_grid(np.asarray(img.affine, dtype=np.float64), source_affine, src_spacing):
            # same shape but maybe another axis order: compare after reorienting both
            from monai.transforms import Orientation

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                a = np.asarray(Orientation(axcodes="RAS")(image).affine, dtype=np.float64)
                b = np.asarray(Orientation(axcodes="RAS")(img).affine, dtype=np.float64)
            if not same_grid(a, b, src_spacing):
                raise fail(role, p, "has the image's shape but a different position or orientation in space "
                           f"(affine\n{np.round(b, 3)}\nvs image\n{np.round(a, 3)})",
                           "re-export the map on the image's grid")
        data[key] = img

    label_keys = [k for k in data if k != "image"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = Compose(_spatial_transforms(preprocess, "image", label_keys))(data)

    img = out["image"]
    label = out["label"].as_tensor()[0].round().to(torch.int64) if "label" in out else None
    rois = {k[4:]: out[k].as_tensor()[0].round().to(torch.int64) for k in label_keys if k.startswith("roi_")}
    affine = np.asarray(img.affine, dtype=np.float64)
    import nibabel as nib

    meta = {
        "image_path": str(record["image_path"]),
        "label_path": str(extra["label"]) if "label" in extra else None,
        "roi_paths": {k: str(v) for k, v in masks.items()},
        "series_uid": series_uid,
        "source_spacing": src_spacing,
        "source_orientation": "".join(nib.aff2axcodes(source_affine)),
        "spacing": tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0)),
        "orientation": "".join(nib.aff2axcodes(affine)),
        "preprocess": preprocess.to_dict(),
    }
    return Case(
        patient_id=pid,
        image=img.as_tensor().to(torch.float32).contiguous(),
        label=label,
        rois=rois,
        affine=affine,
        source_affine=source_affine,
        source_shape=source_shape,  # type: ignore[arg-type]
        meta=meta,
    )


def resample_to_source(map: torch.Tensor, case: Case, *, mode: str | None = None) -> np.ndarray:
    """Put a model-grid map ``(X, Y, Z)`` or ``(C, X, Y, Z)`` back on the original image grid.

    Uses MONAI ``SpatialResample`` from ``case.affine`` to ``case.source_affine``, so the
    result saved with ``source_affine`` overlays the CT in 3D Slicer.  ``mode`` defaults to
    nearest for integer/bool maps and bilinear otherwise; voxels outside the model grid
    (e.g. removed by a foreground crop) become 0.
    """
    from monai.data import MetaTensor
    from monai.transforms import SpatialResample

    t = torch.as_tensor(map)
    squeeze = t.ndim == 3
    if squeeze:
        t = t[None]
    if t.ndim != 4 or tuple(t.shape[1:]) != case.shape:
        raise ValueError(f"map of shape {tuple(map.shape)} is not on the model grid {case.shape} of "
                         f"patient {case.patient_id}")
    discrete = not (t.is_floating_point() or t.is_complex())
    if mode is None:
        mode = "nearest" if discrete else "bilinear"
    src = MetaTensor(t.to(torch.float64 if discrete else torch.float32), affine=torch.as_tensor(case.affine))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = SpatialResample(mode=mode, padding_mode="zeros", dtype=np.float64)(
            src, dst_affine=torch.as_tensor(case.source_affine), spatial_size=case.source_shape
        )
    arr = np.asarray(out.detach().cpu().numpy())
    if discrete:
        arr = np.rint(arr).astype(np.asarray(t.numpy()).dtype if t.dtype != torch.bool else bool)
    else:
        arr = arr.astype(np.float32)
    return arr[0] if squeeze else arr


__all__ = ["NIFTI_SUFFIXES", "Case", "PreprocessSpec", "has_value", "load_case", "resample_to_source", "same_grid"]
