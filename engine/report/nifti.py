"""Attribution maps and the prediction as NIfTI on the original CT grid (3D Slicer, ITK-SNAP).

Maps are computed on the model grid (reoriented, maybe resampled, cropped or padded); here each
one is put back onto the source image's voxel grid with :func:`engine.io.resample_to_source` and
written with the source affine, so a viewer overlays it on the CT without any registration.

Files written to ``out_dir``:

* ``<method>_<class>.nii.gz`` - one float32 attribution map per explained class;
* ``prediction.nii.gz`` - the predicted label map (uint8, or int16 beyond 255 classes);
* ``classes.txt`` - label values and names, in ITK-SNAP's label description format (load it
  in ITK-SNAP with *Segmentation > Import Label Descriptions*);
* ``classes.ctbl`` - the same as a 3D Slicer colour table (``index name R G B A`` per line).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.labels import colour_of
from engine.vocabulary import safe_filename


def _rgb(hex_colour: str) -> tuple[int, int, int]:
    h = hex_colour.lstrip("#")
    return int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16)


def _save(array: np.ndarray, affine: np.ndarray, path: Path, *, intent: str | None = None) -> Path:
    import nibabel as nib

    img = nib.Nifti1Image(array, np.asarray(affine, dtype=np.float64))
    img.header.set_data_dtype(array.dtype)
    # Scanner coordinates in both qform and sform: viewers pick either, both give the CT's space.
    img.set_qform(np.asarray(affine, dtype=np.float64), code=1)
    img.set_sform(np.asarray(affine, dtype=np.float64), code=1)
    if intent is not None:
        img.header.set_intent(intent)
    nib.save(img, str(path))
    return path


def label_description_lines(class_names: Sequence[str]) -> list[str]:
    """ITK-SNAP label description lines (index, RGB, alpha, visibility, mesh visibility, name)."""
    lines = [
        "################################################",
        "# ITK-SnAP Label Description File",
        "# File format:",
        "# IDX   -R-  -G-  -B-  -A--  VIS MSH  LABEL",
        "# Fields:",
        "#    IDX:   Zero-based index",
        "#    -R-:   Red color component (0..255)",
        "#    -G-:   Green color component (0..255)",
        "#    -B-:   Blue color component (0..255)",
        "#    -A-:   Label transparency (0.00 .. 1.00)",
        "#    VIS:   Label visibility (0 or 1)",
        "#    MSH:   Label mesh visibility (0 or 1)",
        "#  LABEL:   Label description",
        "################################################",
    ]
    for i, name in enumerate(class_names):
        r, g, b = _rgb(colour_of(name))
        visible = 0 if i == 0 else 1
        alpha = "0" if i == 0 else "1"
        label = str(name).replace('"', "'")
        lines.append(f"{i:5d} {r:5d} {g:4d} {b:4d} {alpha:>8} {visible:2d} {visible:2d}    \"{label}\"")
    return lines


def write_class_tables(class_names: Sequence[str], out_dir: str | os.PathLike[str]) -> list[Path]:
    """``classes.txt`` (ITK-SNAP) and ``classes.ctbl`` (3D Slicer) naming each label value."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    txt = out / "classes.txt"
    txt.write_text("\n".join(label_description_lines(class_names)) + "\n")
    ctbl = out / "classes.ctbl"
    rows = ["# 3D Slicer colour table: index name R G B A"]
    for i, name in enumerate(class_names):
        r, g, b = _rgb(colour_of(name))
        rows.append(f"{i} {safe_filename(name)} {r} {g} {b} {0 if i == 0 else 255}")
    ctbl.write_text("\n".join(rows) + "\n")
    return [txt, ctbl]


def export_explanation(case: Any, explanation: Any, out_dir: str | os.PathLike[str]) -> list[Path]:
    """Write ``explanation``'s maps and prediction on ``case``'s source grid; returns the files.

    ``case`` is an :class:`engine.io.Case`, ``explanation`` an
    :class:`engine.attribution.explain.Explanation` (computed with ``return_maps=True`` for the
    maps to be written; without maps only the prediction and the class tables are written).
    """
    from engine.io import resample_to_source

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    affine = np.asarray(case.source_affine, dtype=np.float64)
    method = safe_filename(getattr(explanation, "method", "attribution") or "attribution")
    paths: list[Path] = []
    for name, amap in (explanation.maps or {}).items():
        t = torch.as_tensor(amap).detach().to("cpu", torch.float32)
        arr = resample_to_source(t, case).astype(np.float32)
        paths.append(_save(arr, affine, out / f"{method}_{safe_filename(name)}.nii.gz"))
    names = tuple(explanation.class_names)
    pred = torch.as_tensor(explanation.prediction).detach().to("cpu", torch.int64)
    parr = resample_to_source(pred, case)
    dtype = np.uint8 if len(names) <= 256 else np.int16
    paths.append(_save(parr.astype(dtype), affine, out / "prediction.nii.gz", intent="label"))
    paths.extend(write_class_tables(names, out))
    return paths


__all__ = ["export_explanation", "label_description_lines", "safe_filename", "write_class_tables"]
