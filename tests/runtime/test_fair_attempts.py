"""A volume that kills its worker every time fails alone: innocent patients are never charged."""

from __future__ import annotations

import pytest

from tests.runtime.conftest import local_ray, run_with_bad_patient

pytestmark = pytest.mark.slow


def test_a_volume_that_kills_its_worker_fails_after_max_attempts_and_no_other_patient_does(
    tmp_path, monkeypatch, cohort, reference_rows
):
    with local_ray("poison", monkeypatch):  # worker processes crash on any patient called poison*
        summary, failed, error = run_with_bad_patient(tmp_path, cohort, "poison-1", reference_rows, max_attempts=2)
    assert summary.exit_code == 1 and failed == ["poison-1"]
    assert summary.report["attempts_charged"] == 2  # both on the poison volume
    assert "died 2 times" in error
