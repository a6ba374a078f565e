"""Fixtures for runs on Ray: small phantom cohorts and job specs written to tmp folders."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl
import pytest
import torch

from engine import phantoms
from engine.jobs import JobSpec
from engine.pipeline import PatientProcessor
from engine.store import PatientResult

FAST_ATTRIBUTION = {"method": "saliency", "seed": 0}


def job_dict(manifest: Path, **overrides: Any) -> dict[str, Any]:
    """A small job over ``manifest``: the demo model, vanilla gradients, two CPU workers."""
    spec: dict[str, Any] = {
        "job": {"name": "test"},
        "cohort": {"manifest": str(manifest)},
        "model": {"kind": "demo"},
        "attribution": dict(FAST_ATTRIBUTION),
        "runtime": {"workers": 2, "threads_per_worker": 1, "in_flight": 1},
        "anomaly": {"enabled": True, "seed": 0, "n_estimators": 50},
    }
    for key, value in overrides.items():
        spec[key] = {**spec.get(key, {}), **value}
    return spec


def write_job(path: Path, spec: dict[str, Any]) -> Path:
    lines: list[str] = []
    for section, values in spec.items():
        lines.append(f"[{section}]")
        for k, v in values.items():
            if isinstance(v, str):
                lines.append(f'{k} = "{v}"')
            elif isinstance(v, bool):
                lines.append(f"{k} = {'true' if v else 'false'}")
            else:
                lines.append(f"{k} = {v!r}".replace("'", '"'))
        lines.append("")
    path.write_text("\n".join(lines))
    return path


@pytest.fixture(scope="session")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> pl.DataFrame:
    """Six phantoms (one with a planted anomaly), written once per session."""
    out = tmp_path_factory.mktemp("cohort")
    return phantoms.generate_cohort(out, n_patients=6, seed=3, anomaly_fraction=0.2)


@pytest.fixture(scope="session")
def cohort_manifest(cohort: pl.DataFrame, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("manifest") / "manifest.csv"
    cohort.write_csv(path)
    return path


@pytest.fixture(scope="session")
def reference_rows(cohort: pl.DataFrame, cohort_manifest: Path) -> pl.DataFrame:
    """Importances of an undisturbed computation, patient by patient without Ray."""
    torch.set_num_threads(1)
    spec = JobSpec.from_dict(job_dict(cohort_manifest))
    proc = PatientProcessor(spec)
    frames = []
    for record in cohort.iter_rows(named=True):
        out = proc.process(record)
        assert isinstance(out, PatientResult), out
        frames.append(out.importances.with_columns(pl.lit(out.patient_id).alias("patient_id")))
    return pl.concat(frames)


def assert_same_importances(stored: pl.DataFrame, reference: pl.DataFrame) -> None:
    """Every stored row exists once and equals the undisturbed value (float tolerance)."""
    keys = ["patient_id", "method", "target", "roi", "stat", "sign"]
    assert stored.select(keys).is_duplicated().sum() == 0
    joined = reference.join(stored.select([*keys, pl.col("value").alias("stored")]), on=keys, how="full", coalesce=True)
    assert joined.height == reference.height == stored.height
    diff = (joined["value"] - joined["stored"]).abs() / joined["value"].abs().clip(lower_bound=1e-12)
    assert float(diff.max()) < 1e-5
