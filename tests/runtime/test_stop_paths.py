"""The runtime's two remaining ways to go wrong, on a real local Ray: a patient that never finishes
(its worker still answers pings) and workers that cannot start at all."""

from __future__ import annotations

import os
import re
from pathlib import Path

import polars as pl
import pytest

from engine import store
from engine.jobs import JobSpec
from engine.runtime import run_job
from tests.runtime.conftest import assert_same_importances, job_dict

pytestmark = pytest.mark.slow

REPO = str(Path(__file__).resolve().parents[2])


def _ray_with(hook: str) -> None:
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=100 * 1024 * 1024,
             log_to_driver=False, runtime_env={"worker_process_setup_hook": f"tests.runtime.hooks.{hook}",
                                               "env_vars": {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                                                            "PYTHONPATH": os.pathsep.join(
                                                                filter(None, [REPO, os.environ.get("PYTHONPATH")]))}})


@pytest.fixture
def ray_hook(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    import ray
    from ray._private import ray_constants

    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
    _ray_with(request.param)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.mark.parametrize("ray_hook", ["hang"], indirect=True)
def test_a_patient_that_never_finishes_fails_after_max_attempts_and_the_run_completes(
    tmp_path, ray_hook, cohort, reference_rows
):
    first = cohort.row(0, named=True)
    stuck = pl.DataFrame([{**first, "patient_id": "hang-1"}], schema=cohort.schema)
    manifest = tmp_path / "hang.csv"
    pl.concat([cohort.head(1), stuck, cohort.slice(1)]).write_csv(manifest)
    spec = JobSpec.from_dict(job_dict(manifest, runtime={"in_flight": 2, "max_attempts": 2, "patient_timeout_s": 4},
                                      anomaly={"enabled": False}))
    db = tmp_path / "hang.duckdb"
    summary = run_job(spec, db=db, run_id="h", progress=False)
    assert summary.exit_code == 1 and summary.report["stopped"] is None
    assert summary.counts["done"] == cohort.height and summary.counts["failed"] == 1
    assert summary.report["attempts_charged"] == 2  # both on the stuck patient, alone on its worker
    reasons = [a["stop_reason"] or "" for a in summary.report["actors"]]
    assert sum("hang-1 was loading for more than 4 s" in r for r in reasons) >= 2
    with store.open(db) as s:
        failed = s.patients("h").filter(pl.col("status") == "failed")
        imp = s.importances("h").drop("run_id")  # type: ignore[union-attr]
    assert failed["patient_id"].to_list() == ["hang-1"]
    assert "ran longer than [runtime] patient_timeout_s = 4 s 2 times" in failed["error"][0]
    assert_same_importances(imp, reference_rows)


@pytest.mark.parametrize("ray_hook", ["broken_model"], indirect=True)
def test_workers_that_cannot_load_the_model_stop_the_run_with_exit_3_and_the_reason(
    tmp_path, ray_hook, cohort_manifest, capsys
):
    spec = JobSpec.from_dict(job_dict(cohort_manifest, anomaly={"enabled": False}))
    db = tmp_path / "broken.duckdb"
    summary = run_job(spec, db=db, run_id="b", progress=False)
    assert summary.exit_code == 3
    stopped = summary.report["stopped"]
    # two actors start at once, so the count that stops the run is 3 or 4
    m = re.match(r"workers failed to start (\d+) times in a row: OSError: cannot read the model weights", stopped)
    assert m and int(m.group(1)) >= 3, stopped
    with store.open(db) as s:  # nothing was computed, nothing is lost: every patient waits for a rerun
        assert set(s.patients("b")["status"].to_list()) == {"pending"}
