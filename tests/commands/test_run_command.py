"""`agg2exp run`: a job that cannot run stops with one clear line (exit 2) before any patient is touched."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from monai.networks.nets import UNet

from engine.cli import main as cli_main

JOB = """
[job]
name = "bad"

[cohort]
manifest = "{manifest}"

[model]
{model}

[attribution]
method = "saliency"
"""


def _manifest(tmp_path: Path) -> Path:
    path = tmp_path / "manifest.csv"
    path.write_text(f"patient_id,image_path\np1,{tmp_path / 'missing.nii.gz'}\n")
    return path


def _error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ('kind = "network"\nname = "UNet"\nweights = "{weights}"\nroi_size = [16, 16, 16]\nclass_names = ["a", "b"]\n'
         "[model.args]\nspatial_dims = 3\nin_channels = 1\nout_channels = 2\nchannels = [4, 8, 16]\nstrides = [2, 2]",
         "unexpected"),
        ('kind = "network"\nname = "UNet"\nroi_size = [16, 16, 16]\nclass_names = ["a", "b", "c"]\n'
         "[model.args]\nspatial_dims = 3\nin_channels = 1\nout_channels = 2\nchannels = [4, 8]\nstrides = [2]",
         "class"),
        ('kind = "demo"\nweights = "nowhere.pt"', "not found"),
        ('kind = "demo"\ncolour = "red"', "colour"),
    ],
)
def test_bad_model_stops_before_any_patient(tmp_path, capsys, model, expected):
    weights = tmp_path / "w.pt"
    torch.save(UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8), strides=(2,)).state_dict(), weights)
    job = tmp_path / "job.toml"
    job.write_text(JOB.format(manifest=_manifest(tmp_path), model=model.format(weights=weights)))
    db = tmp_path / "bad.duckdb"
    assert cli_main(["run", str(job), "--db", str(db), "--no-progress"]) == 2
    assert expected in _error(capsys)
    assert not db.exists()  # nothing was registered, computed or written


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[job]\nname = 'x'\n[cohort]\nphantoms = 2\n[model]\nkind = 'demo'\n[attribution]\nmethod = 'magic'\n", "unknown attribution method 'magic'"),
        ("[job]\nname = 'x'\n[cohort]\nphantoms = 2\n[model]\nkind = 'demo'\n[runtime]\nworkerz = 2\n", "workerz"),
        ("[job]\nname = 'x'\n[model]\nkind = 'demo'\n", "[cohort]"),
        ("[job]\nname = 'x'\n[cohort]\nphantoms = 2\nmanifest = 'm.csv'\n[model]\nkind = 'demo'\n", "exactly one"),
        ("[job\nname = 'x'\n", "not valid TOML"),
    ],
)
def test_bad_job_specs(tmp_path, capsys, text, expected):
    job = tmp_path / "job.toml"
    job.write_text(text)
    assert cli_main(["run", str(job), "--db", str(tmp_path / "x.duckdb")]) == 2
    assert expected in _error(capsys)


def test_missing_job_file(tmp_path, capsys):
    assert cli_main(["run", str(tmp_path / "nope.toml")]) == 2
    assert "does not exist" in _error(capsys)
