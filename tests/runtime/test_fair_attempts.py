"""A volume that kills its worker every time fails alone: innocent patients are never charged."""

from __future__ import annotations

import os
from pathlib import Path

import polars as pl
import pytest

from engine import store
from engine.jobs import JobSpec
from engine.runtime import run_job
from tests.runtime.conftest import assert_same_importances, job_dict

pytestmark = pytest.mark.slow

REPO = str(Path(__file__).resolve().parents[2])


@pytest.fixture
def ray_with_poison(monkeypatch: pytest.MonkeyPatch):
    """A local Ray whose worker processes crash on any patient called ``poison*``."""
    import ray
    from ray._private import ray_constants

    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=100 * 1024 * 1024,
             log_to_driver=False, runtime_env={"worker_process_setup_hook": "tests.runtime.poison.install",
                                               "env_vars": {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                                                            # the hook lives in this repository's tests package
                                                            "PYTHONPATH": os.pathsep.join(
                                                                filter(None, [REPO, os.environ.get("PYTHONPATH")]))}})
    try:
        yield
    finally:
        ray.shutdown()


def test_a_volume_that_kills_its_worker_fails_after_max_attempts_and_no_other_patient_does(
    tmp_path, ray_with_poison, cohort, reference_rows
):
    first = cohort.row(0, named=True)
    poison = pl.DataFrame([{**first, "patient_id": "poison-1"}], schema=cohort.schema)
    manifest = tmp_path / "poison.csv"
    pl.concat([cohort.head(1), poison, cohort.slice(1)]).write_csv(manifest)  # next to an innocent patient
    spec = JobSpec.from_dict(job_dict(manifest, runtime={"in_flight": 2, "max_attempts": 2},
                                      anomaly={"enabled": False}))
    db = tmp_path / "poison.duckdb"
    summary = run_job(spec, db=db, run_id="p", progress=False)
    assert summary.exit_code == 1
    assert summary.counts["done"] == cohort.height and summary.counts["failed"] == 1
    assert summary.report["attempts_charged"] == 2  # both on the poison volume
    with store.open(db) as s:
        failed = s.patients("p").filter(pl.col("status") == "failed")
        imp = s.importances("p").drop("run_id")  # type: ignore[union-attr]
    assert failed["patient_id"].to_list() == ["poison-1"]
    assert "died 2 times" in failed["error"][0]
    assert_same_importances(imp, reference_rows)
