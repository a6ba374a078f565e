"""Runs on Ray with two CPU actors: rows in DuckDB, bad inputs, worker and driver loss, live reads."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import polars as pl
import pytest

from engine import store
from engine.cli import main as cli_main
from engine.jobs import JobSpec
from engine.runtime import run_job
from tests.runtime.conftest import assert_same_importances, job_dict, write_job

pytestmark = pytest.mark.slow


def _stored(db: Path, run_id: str) -> pl.DataFrame:
    with store.open(db) as s:
        return s.importances(run_id).drop("run_id")  # type: ignore[union-attr]


def test_two_actor_run_stores_every_patient(tmp_path, cohort, cohort_manifest, reference_rows):
    db = tmp_path / "run.duckdb"
    summary = run_job(JobSpec.from_dict(job_dict(cohort_manifest)), db=db, run_id="r", progress=False)
    assert summary.exit_code == 0
    assert summary.counts["done"] == cohort.height
    devices = summary.report["devices"]
    assert len(devices) == 2 and len({d["pid"] for d in devices}) == 2  # two actors, two processes
    with store.open(db) as s:
        patients = s.patients("r")
        assert set(patients["status"]) == {"done"}
        assert set(patients["site"]) <= {"A", "B", "C"}  # manifest metadata kept
        preds = s.predictions("r")
        assert preds.group_by("patient_id").len()["len"].to_list() == [17] * cohort.height
        assert preds["dice"].drop_nulls().len() > 0  # label maps give Dice
        scores = s.anomaly_scores("r")
        assert scores.filter(pl.col("target") == "__mean__").height == cohort.height
        info = s.run_info("r")
        assert info["status"] == "done" and info["report"]["counts"]["done"] == cohort.height
        assert info["versions"]["torch"]
    assert_same_importances(_stored(db, "r"), reference_rows)
    # A local run starts its own Ray and binds it to loopback.
    ray_info = summary.report["ray"]
    assert ray_info["started_locally"] and ray_info["address"].startswith("127.0.0.1:")


def _bad_inputs(tmp_path: Path, cohort: pl.DataFrame) -> pl.DataFrame:
    good = cohort.row(0, named=True)
    img = nib.load(good["image_path"])
    data = np.asarray(img.dataobj)
    truncated = tmp_path / "truncated.nii.gz"
    raw = Path(good["image_path"]).read_bytes()
    truncated.write_bytes(raw[: len(raw) // 3])
    text = tmp_path / "notes.nii.gz"
    text.write_text("this is not an image\n")
    flat = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(data[:, :, 0].astype(np.float32), img.affine), flat)
    nan = tmp_path / "nan.nii.gz"
    nan_data = data.astype(np.float32)
    nan_data[5, 5, 5] = np.nan
    nib.save(nib.Nifti1Image(nan_data, img.affine), nan)
    small_label = tmp_path / "small_label.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((10, 10, 10), np.uint8), img.affine), small_label)
    rows = [
        {"patient_id": "bad-missing", "image_path": str(tmp_path / "does_not_exist.nii.gz"), "label_path": None},
        {"patient_id": "bad-truncated", "image_path": str(truncated), "label_path": None},
        {"patient_id": "bad-not-image", "image_path": str(text), "label_path": None},
        {"patient_id": "bad-2d", "image_path": str(flat), "label_path": None},
        {"patient_id": "bad-nan", "image_path": str(nan), "label_path": None},
        {"patient_id": "bad-label-shape", "image_path": good["image_path"], "label_path": str(small_label)},
    ]
    keep = cohort.select("patient_id", "image_path", "label_path").head(3)
    return pl.concat([keep, pl.DataFrame(rows, schema=keep.schema)])


def test_bad_inputs_fail_per_patient_and_the_run_completes(tmp_path, cohort, capsys):
    manifest = tmp_path / "bad.csv"
    _bad_inputs(tmp_path, cohort).write_csv(manifest)
    job = write_job(tmp_path / "bad.toml", job_dict(manifest, anomaly={"enabled": False}))
    db = tmp_path / "bad.duckdb"
    code = cli_main(["run", str(job), "--db", str(db), "--run-id", "bad", "--no-progress"])
    assert code == 1  # some patients failed
    out = capsys.readouterr().out
    assert "3 patients done, 6 failed" in out
    with store.open(db) as s:
        p = {r["patient_id"]: r for r in s.patients("bad").iter_rows(named=True)}
        assert s.importances("bad").filter(pl.col("patient_id").str.starts_with("bad")).height == 0  # type: ignore[union-attr]
    assert all(p[pid]["status"] == "done" for pid in p if not pid.startswith("bad"))
    expected = {
        "bad-missing": "does not exist",
        "bad-truncated": "truncated",
        "bad-not-image": "not",
        "bad-2d": "2D",
        "bad-nan": "NaN",
        "bad-label-shape": "shape",
    }
    for pid, words in expected.items():
        assert p[pid]["status"] == "failed"
        assert words.lower() in p[pid]["error"].lower(), (pid, p[pid]["error"])
        assert p[pid]["traceback"]


def test_killed_worker_is_replaced_and_nothing_is_lost(tmp_path, cohort, cohort_manifest, reference_rows):
    db = tmp_path / "kill.duckdb"
    killed: list[int] = []

    def kill_one_worker(pid: str, status: str) -> None:
        if killed:
            return
        # SIGKILL an actor process, preferring one busy with a patient (Ray titles it ".process").
        workers = _actor_processes("PatientWorker")
        busy = [p for p, title in workers if ".process" in title]
        victim = (busy or [p for p, _ in workers])[0]
        os.kill(victim, signal.SIGKILL)
        killed.append(victim)

    spec = JobSpec.from_dict(job_dict(cohort_manifest, runtime={"in_flight": 2}))
    summary = run_job(spec, db=db, run_id="k", progress=False, on_result=kill_one_worker)
    assert killed, "no worker was killed"
    assert summary.counts["done"] == cohort.height and summary.counts["failed"] == 0
    assert summary.report["requeued_after_worker_loss"] >= 1
    with store.open(db) as s:
        assert s.frame("SELECT count(*) AS n FROM patients WHERE run_id = 'k' AND status = 'done'")["n"][0] == cohort.height
    assert_same_importances(_stored(db, "k"), reference_rows)


def _descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            return False
    return False


def _actor_processes(name: str) -> list[tuple[int, str]]:
    """(pid, process title) of this test's Ray actor processes of a class (the local Ray this
    process started is its descendant; other Ray instances on the machine are left alone)."""
    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            title = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if title.startswith(f"ray::{name}") and _descends_from(int(proc.name), os.getpid()):
            out.append((int(proc.name), title))
    return out


def _done_in_snapshot(db: Path, run_id: str) -> int:
    try:
        with store.open(db) as s:
            return int(s.frame("SELECT count(*) AS n FROM patients WHERE run_id = ? AND status = 'done'", [run_id])["n"][0])
    except Exception:  # noqa: BLE001 - not written yet
        return 0


def test_killed_driver_resumes_computing_only_missing_patients(tmp_path, cohort, cohort_manifest, reference_rows, capsys):
    job = write_job(tmp_path / "job.toml", job_dict(cohort_manifest, runtime={"workers": 1}))
    db = tmp_path / "resume.duckdb"
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine.cli", "run", str(job), "--db", str(db), "--run-id", "res", "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )
    deadline = time.time() + 240
    while time.time() < deadline and _done_in_snapshot(db, "res") < 2 and proc.poll() is None:
        time.sleep(0.3)
    assert proc.poll() is None, proc.stdout.read().decode()[-2000:] if proc.stdout else ""
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
    proc.wait()
    with store.open(db) as s:
        done_before = len(s.patient_ids("res", status=["done"]))
    assert 2 <= done_before < cohort.height
    code = cli_main(["run", str(job), "--db", str(db), "--run-id", "res", "--resume", "--no-progress"])
    assert code == 0
    captured = capsys.readouterr()
    out = captured.out + captured.err
    assert f"{done_before} of {cohort.height} patients already done; computing {cohort.height - done_before}" in out
    with store.open(db) as s:
        assert s.status_counts("res")["done"] == cohort.height
        report = s.run_info("res")["report"]
        assert report["computed"] == cohort.height - done_before
    assert_same_importances(_stored(db, "res"), reference_rows)


def test_query_while_a_run_writes_sees_a_consistent_partial_result(tmp_path, cohort, cohort_manifest):
    db = tmp_path / "live.duckdb"
    seen: list[dict] = []

    def read_live(pid: str, status: str) -> None:
        # A separate process, as a user in another terminal would run it.
        code = (
            "import json, engine.store as st\n"
            f"s = st.open({str(db)!r})\n"
            "done = s.frame(\"SELECT patient_id FROM patients WHERE run_id='live' AND status='done'\")['patient_id'].to_list()\n"
            "rows = s.frame(\"SELECT patient_id, count(*) AS n FROM importances WHERE run_id='live' GROUP BY ALL\")\n"
            "print(json.dumps({'snapshot': s.is_snapshot, 'done': sorted(done), 'rows': dict(zip(rows['patient_id'].to_list(), rows['n'].to_list()))}))\n"
        )
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        seen.append(json.loads(res.stdout))

    spec = JobSpec.from_dict(job_dict(cohort_manifest, anomaly={"enabled": False}))
    run_job(spec, db=db, run_id="live", progress=False, on_result=read_live)
    assert seen and all(v["snapshot"] for v in seen)  # the writer held the file; readers used snapshots
    partial = [v for v in seen if 0 < len(v["done"]) < cohort.height]
    assert partial, seen
    for v in seen:
        # consistent: exactly the done patients have rows, each with a full set
        assert sorted(v["rows"]) == v["done"]
        assert len(set(v["rows"].values())) <= 1
