"""Where patients come from: cohort manifests, folders scanned for CTs, and the phantom cohort.

A manifest (CSV or Parquet, :func:`read_manifest`) lists one patient per row: ``patient_id``,
``image_path``, optional ``label_path``, ``series_uid`` and ``roi_<name>`` mask columns, and any
metadata. :func:`scan_cohort` writes one by walking a folder (``agg2exp cohort scan``);
:func:`resolve_cohort` is the manifest of a job (read, or the phantoms it asks for generated),
used by ``run`` and ``evaluate`` alike. Files are not opened here: a bad volume fails only its
own patient, later, in :func:`engine.volumes.load_case`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from engine.errors import JobSpecError, VolumeError
from engine.volumes import NIFTI_SUFFIXES, has_value, same_grid

def _resolve(value: Any, base: Path) -> Any:
    if not has_value(value):
        return None
    p = Path(str(value).strip()).expanduser()
    return str(p if p.is_absolute() else (base / p))


def read_manifest(path: str | os.PathLike) -> pl.DataFrame:
    """Read a cohort manifest (CSV or Parquet) and resolve its relative paths.

    Needs ``patient_id`` and ``image_path``; optional ``label_path``, ``series_uid`` and
    ``roi_<name>`` columns (custom RoI masks); other columns (age, site, ...) are kept as
    metadata.  Paths are resolved against the manifest's folder; files are not opened here,
    so that a bad volume fails only its own patient.  Problems are ``JobSpecError``.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise JobSpecError(f"manifest {p} does not exist; give a CSV or Parquet file listing the patients")
    try:
        if p.suffix.lower() in (".parquet", ".pq"):
            df = pl.read_parquet(p)
        else:
            df = pl.read_csv(p, infer_schema=False, null_values=[""])
    except Exception as exc:
        raise JobSpecError(f"manifest {p} cannot be read ({type(exc).__name__}: {exc}); "
                           "give a CSV with a header row, or a Parquet file") from exc
    df = df.rename({c: c.strip() for c in df.columns})
    missing = [c for c in ("patient_id", "image_path") if c not in df.columns]
    if missing:
        raise JobSpecError(f"manifest {p} lacks column(s) {', '.join(missing)} (it has {', '.join(df.columns) or 'none'}); "
                           "add them: patient_id, image_path[, label_path, roi_<name>...]")
    bad_roi = [c for c in df.columns if c.startswith("roi_") and not re.fullmatch(r"roi_[A-Za-z0-9_.-]+", c)]
    if bad_roi or "roi_" in df.columns:
        raise JobSpecError(f"manifest {p}: RoI column(s) {bad_roi or ['roi_']} need a name after 'roi_' "
                           "(letters, digits, _ . -), e.g. roi_tumour")
    if df.height == 0:
        raise JobSpecError(f"manifest {p} lists no patients; add one row per patient")
    path_cols = ["image_path", "label_path", *[c for c in df.columns if c.startswith("roi_")]]
    df = df.with_columns(
        pl.col("patient_id").cast(pl.String).str.strip_chars(),
        *[pl.col(c).cast(pl.String) for c in [*path_cols, "series_uid"] if c in df.columns],
    )
    row_no = (lambda i: i + 2) if p.suffix.lower() not in (".parquet", ".pq") else (lambda i: i + 1)
    where = "line" if p.suffix.lower() not in (".parquet", ".pq") else "row"
    for col in ("patient_id", "image_path"):
        empty = [i for i, v in enumerate(df[col].to_list()) if not has_value(v)]
        if empty:
            raise JobSpecError(f"manifest {p}: {col} is empty on {where}(s) {', '.join(str(row_no(i)) for i in empty[:10])}; "
                               "fill it in or remove those rows")
    ids = df["patient_id"].to_list()
    seen: dict[str, list[int]] = {}
    for i, v in enumerate(ids):
        seen.setdefault(v, []).append(row_no(i))
    dupes = {k: v for k, v in seen.items() if len(v) > 1}
    if dupes:
        desc = "; ".join(f"{k!r} on {where}s {', '.join(map(str, v))}" for k, v in list(dupes.items())[:10])
        raise JobSpecError(f"manifest {p}: duplicate patient_id(s): {desc}; each patient must appear once")
    base = p.resolve().parent
    df = df.with_columns(
        *[pl.col(c).map_elements(lambda v, b=base: _resolve(v, b), return_dtype=pl.String)
          for c in path_cols if c in df.columns]
    )
    if "label_path" not in df.columns:
        df = df.with_columns(pl.lit(None, dtype=pl.String).alias("label_path"))
    return df


def manifest_rois(manifest: pl.DataFrame) -> tuple[str, ...]:
    """Names of the custom RoI masks a manifest provides (its ``roi_<name>`` columns)."""
    return tuple(c[4:] for c in manifest.columns if c.startswith("roi_"))



_LABEL_TOKENS = {"seg", "segs", "segmentation", "segmentations", "label", "labels", "mask", "masks", "gt", "labelmap"}
_GENERIC_STEMS = {"ct", "image", "img", "volume", "vol", "scan", "data"}


def _nifti_stem(name: str) -> str:
    low = name.lower()
    for suf in (".nii.gz", ".nii"):
        if low.endswith(suf):
            return name[: -len(suf)]
    return name


def _looks_like_label(path: Path, dtype: Any) -> bool:
    tokens = set(re.split(r"[^a-z0-9]+", _nifti_stem(path.name).lower()))
    return bool(tokens & _LABEL_TOKENS) or np.dtype(dtype) in (np.dtype(np.uint8), np.dtype(bool))


def scan_cohort(root: str | os.PathLike) -> tuple[pl.DataFrame, list[tuple[str, str]]]:
    """Find CT volumes under ``root``: NIfTI files and DICOM series (grouped by SeriesInstanceUID).

    Returns a manifest (``patient_id, image_path, label_path, format, series_uid``; absolute
    paths) and the list of ``(path, reason)`` that were skipped.  NIfTI files that look like
    label maps (name contains seg/label/mask/gt, or uint8 data) become the ``label_path`` of
    the one image with the same grid in the same folder (or, failing that, the one DICOM
    series in a sub-folder with that grid size), else are skipped.  Only headers are
    read, so truncated data is found later by :func:`load_case`.
    """
    import nibabel as nib
    import pydicom
    from pydicom.errors import InvalidDicomError

    base = Path(root).expanduser()
    if not base.is_dir():
        raise VolumeError(f"cohort folder {base} does not exist or is not a folder; give the folder holding the scans")
    base = base.resolve()
    skipped: list[tuple[str, str]] = []
    images: list[dict[str, Any]] = []  # patient_id, image_path, format, series_uid, shape, affine, dir
    labels: list[tuple[Path, tuple[int, ...], np.ndarray, str]] = []

    for dirpath, dirnames, filenames in os.walk(base):
        dirnames.sort()
        d = Path(dirpath)
        if d.name.lower() == "segmentations" and d != base:
            skipped.append((str(d), "per-structure masks folder (TotalSegmentator layout): not images; "
                                    "use them as roi_<name> columns or merge them into a label map"))
            dirnames[:] = []
            continue
        series: dict[str, list[Any]] = {}
        for fname in sorted(filenames):
            f = d / fname
            if fname.lower().endswith(NIFTI_SUFFIXES):
                try:
                    img = nib.load(str(f))
                    shape = tuple(int(s) for s in img.shape)
                    dtype = img.get_data_dtype()
                except Exception as exc:
                    skipped.append((str(f), f"unreadable NIfTI ({type(exc).__name__}: {exc})"))
                    continue
                if len(shape) < 3 or min(shape[:3]) < 2:
                    skipped.append((str(f), f"not a 3D volume (shape {shape})"))
                    continue
                if _looks_like_label(f, dtype):
                    labels.append((f, shape[:3], np.asarray(img.affine), ""))
                    continue
                images.append({"stem": _nifti_stem(fname), "image_path": str(f), "format": "nifti",
                               "series_uid": None, "shape": shape[:3], "affine": np.asarray(img.affine), "dir": d})
                continue
            if fname.startswith("."):
                continue
            try:
                ds = pydicom.dcmread(f, stop_before_pixels=True)
            except (InvalidDicomError, OSError, EOFError, ValueError, AttributeError, KeyError, TypeError):
                skipped.append((str(f), "not a NIfTI or DICOM file"))
                continue
            if "Rows" not in ds:
                skipped.append((str(f), f"DICOM without image data (Modality {ds.get('Modality', '?')})"))
                continue
            series.setdefault(str(ds.get("SeriesInstanceUID", "unknown")), []).append(ds)
        multi = len(series) > 1
        for uid, slices in series.items():
            first = slices[0]
            where = f"{d} (series {uid})" if multi else str(d)
            modality = str(first.get("Modality", "?"))
            if modality != "CT":
                skipped.append((where, f"not a CT series (Modality {modality}, {len(slices)} file(s))"))
                continue
            if len(slices) < 2 and int(first.get("NumberOfFrames", 1) or 1) < 2:
                skipped.append((where, "single-slice CT series: not a 3D volume"))
                continue
            stem = str(d.relative_to(base)).replace(os.sep, "_") if d != base else d.name
            if multi:
                stem += f"_s{first.get('SeriesNumber', uid[-6:])}"
            n = len(slices) if len(slices) > 1 else int(first.get("NumberOfFrames", 1))
            images.append({"stem": stem, "image_path": str(d), "format": "dicom", "series_uid": uid if multi else None,
                           "shape": (int(first.Columns), int(first.Rows), n), "affine": None, "dir": d})

    # patient ids: file stem, or the folder name for generic stems; unique
    used: dict[str, int] = {}
    for im in images:
        pid = im["stem"]
        if im["format"] == "nifti" and pid.lower() in _GENERIC_STEMS and im["dir"] != base:
            pid = str(im["dir"].relative_to(base)).replace(os.sep, "_")
        if pid in used:
            used[pid] += 1
            pid = f"{pid}_{used[pid]}"
        else:
            used[pid] = 1
        im["patient_id"] = pid
        im["label_path"] = None

    for lab, shape, affine, _ in labels:
        def _fits(im: dict[str, Any]) -> bool:
            if sorted(im["shape"]) != sorted(shape):
                return False
            return im["affine"] is None or im["shape"] != shape or same_grid(
                im["affine"], affine, np.linalg.norm(affine[:3, :3], axis=0))

        cands = [im for im in images if im["dir"] == lab.parent and _fits(im)] or [
            im for im in images if im["format"] == "dicom" and im["dir"].parent == lab.parent and _fits(im)]
        free = [im for im in cands if im["label_path"] is None]
        if len(free) == 1:
            free[0]["label_path"] = str(lab)
        elif not cands:
            skipped.append((str(lab), f"looks like a label map and no image in its folder has its grid {shape}; "
                                      "if it is a CT, rename it, else add it as label_path by hand"))
        else:
            skipped.append((str(lab), f"looks like a label map matching {len(cands)} images in its folder "
                                      f"({', '.join(im['patient_id'] for im in cands)}); add it as label_path by hand"))

    manifest = pl.DataFrame(
        {
            "patient_id": [im["patient_id"] for im in images],
            "image_path": [im["image_path"] for im in images],
            "label_path": [im["label_path"] for im in images],
            "format": [im["format"] for im in images],
            "series_uid": [im["series_uid"] for im in images],
        },
        schema={c: pl.String for c in ("patient_id", "image_path", "label_path", "format", "series_uid")},
    )
    return manifest, skipped


def resolve_cohort(spec: Any, *, progress: bool = True) -> pl.DataFrame:
    """The manifest of a job (``engine.jobs.JobSpec``): read it, or generate the phantom cohort it asks for."""
    c = spec.cohort
    if c.manifest is not None:
        manifest = read_manifest(spec.resolve_path(c.manifest))
    else:
        from engine import phantoms

        out_dir = spec.resolve_path(c.out_dir)
        manifest = phantoms.generate_cohort(
            out_dir, n_patients=int(c.phantoms or 0), seed=c.seed, anomaly_fraction=c.anomaly_fraction,
            progress=progress,
        )
    if c.limit is not None:
        manifest = manifest.head(c.limit)
    return manifest


__all__ = ["manifest_rois", "read_manifest", "resolve_cohort", "scan_cohort"]
