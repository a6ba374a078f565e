"""The runtime's two remaining ways to go wrong, on a real local Ray: a patient that never finishes
(its worker still answers pings) and workers that cannot start at all."""

from __future__ import annotations

import re

import pytest

from engine import store
from engine.jobs import JobSpec
from engine.runtime import run_job
from tests.runtime.conftest import job_dict, local_ray, run_with_bad_patient

pytestmark = pytest.mark.slow


def test_a_patient_that_never_finishes_fails_after_max_attempts_and_the_run_completes(
    tmp_path, monkeypatch, cohort, reference_rows
):
    with local_ray("hang", monkeypatch):  # loading any patient called hang* never returns
        summary, failed, error = run_with_bad_patient(tmp_path, cohort, "hang-1", reference_rows, max_attempts=2,
                                                      patient_timeout_s=4)
    assert summary.exit_code == 1 and summary.report["stopped"] is None and failed == ["hang-1"]
    assert summary.report["attempts_charged"] == 2  # both on the stuck patient, alone on its worker
    reasons = [a["stop_reason"] or "" for a in summary.report["actors"]]
    assert sum("hang-1 was loading for more than 4 s" in r for r in reasons) >= 2
    assert "ran longer than [runtime] patient_timeout_s = 4 s 2 times" in error


def test_workers_that_cannot_load_the_model_stop_the_run_with_exit_3_and_the_reason(
    tmp_path, monkeypatch, cohort_manifest
):
    spec = JobSpec.from_dict(job_dict(cohort_manifest, anomaly={"enabled": False}))
    db = tmp_path / "broken.duckdb"
    with local_ray("broken_model", monkeypatch):  # loading the model raises in every worker
        summary = run_job(spec, db=db, run_id="b", progress=False)
    assert summary.exit_code == 3
    # two actors start at once, so the count that stops the run is 3 or 4
    m = re.match(r"workers failed to start (\d+) times in a row: OSError: cannot read the model weights",
                 summary.report["stopped"])
    assert m and int(m.group(1)) >= 3, summary.report["stopped"]
    with store.open(db) as s:  # nothing was computed, nothing is lost: every patient waits for a rerun
        assert set(s.patients("b")["status"].to_list()) == {"pending"}
