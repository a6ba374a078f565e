"""Fixtures for runs on Ray: small phantom cohorts and job specs written to tmp folders."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
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


REPO = str(Path(__file__).resolve().parents[2])


@contextlib.contextmanager
def local_ray(hook: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A local 2-CPU Ray whose worker processes run ``tests.runtime.hooks.<hook>`` at start-up."""
    import ray
    from ray._private import ray_constants

    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=100 * 1024 * 1024,
             log_to_driver=False, runtime_env={"worker_process_setup_hook": f"tests.runtime.hooks.{hook}",
                                               "env_vars": {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                                                            # the hooks live in this repository's tests package
                                                            "PYTHONPATH": os.pathsep.join(
                                                                filter(None, [REPO, os.environ.get("PYTHONPATH")]))}})
    try:
        yield
    finally:
        ray.shutdown()


def run_with_bad_patient(tmp_path: Path, cohort: pl.DataFrame, patient_id: str, reference: pl.DataFrame,
                         **runtime: Any) -> tuple[Any, list[str], str]:
    """Run the cohort with one more patient (a copy of the first, named ``patient_id``) second in
    the manifest, next to an innocent one; check that every other patient is done with the
    reference's importances. Returns (run summary, failed patient ids, the first failure's error)."""
    from engine import store
    from engine.runtime import run_job

    first = cohort.row(0, named=True)
    bad = pl.DataFrame([{**first, "patient_id": patient_id}], schema=cohort.schema)
    manifest = tmp_path / "bad.csv"
    pl.concat([cohort.head(1), bad, cohort.slice(1)]).write_csv(manifest)
    spec = JobSpec.from_dict(job_dict(manifest, runtime={"in_flight": 2, **runtime}, anomaly={"enabled": False}))
    db = tmp_path / "bad.duckdb"
    summary = run_job(spec, db=db, run_id="bad", progress=False)
    assert summary.counts["done"] == cohort.height
    with store.open(db) as s:
        failed = s.patients("bad").filter(pl.col("status") == "failed")
        imp = s.importances("bad").drop("run_id")  # type: ignore[union-attr]
    assert_same_importances(imp, reference)
    return summary, failed["patient_id"].to_list(), (failed["error"][0] if failed.height else "")
