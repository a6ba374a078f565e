"""Tests for ``agg2exp cohort scan``."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.cli import main
from engine.cohorts import read_manifest
from tests._data import totalseg_dir


def test_scan_writes_manifest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = totalseg_dir()
    out = tmp_path / "manifest.csv"
    assert main(["cohort", "scan", str(data), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "found 3 volume(s)" in printed
    assert "example_ct_dicom  [dicom]" in printed
    assert "classes_total.json: not a NIfTI or DICOM file" in printed
    df = read_manifest(out)
    assert sorted(df["patient_id"].to_list()) == ["example_ct", "example_ct_dicom", "example_ct_sm"]
    row = df.filter(df["patient_id"] == "example_ct_sm").row(0, named=True)
    assert Path(row["image_path"]) == data / "example_ct_sm.nii.gz"
    assert Path(row["label_path"]) == data / "example_seg.nii.gz"


def test_scan_relative_paths_and_parquet(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import nibabel as nib
    import numpy as np

    (tmp_path / "scans").mkdir()
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), dtype=np.int16), np.eye(4)), str(tmp_path / "scans" / "p1.nii.gz"))
    (tmp_path / "scans" / "notes.txt").write_text("hello")
    out = tmp_path / "m.parquet"
    assert main(["cohort", "scan", str(tmp_path / "scans"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "notes.txt: not a NIfTI or DICOM file" in printed
    import polars as pl

    assert pl.read_parquet(out)["image_path"].to_list() == ["scans/p1.nii.gz"]
    assert read_manifest(out)["image_path"].to_list() == [str(tmp_path / "scans" / "p1.nii.gz")]


def test_scan_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["cohort", "scan", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "junk.txt").write_text("x")
    assert main(["cohort", "scan", str(tmp_path)]) == 1
    assert "found 0 volume(s)" in capsys.readouterr().out
    assert main(["cohort", "scan", str(tmp_path), "--out", str(tmp_path / "m.txt")]) == 2
    assert ".csv or .parquet" in capsys.readouterr().err
