"""``agg2exp evaluate``: job parsing, the stored rows, the printed table, determinism, user errors."""

from __future__ import annotations


import polars as pl
import pytest
import torch

from engine import store
from engine.cli import main
from engine.commands.evaluate import load_evaluation
from engine.resources import job_file


JOB = """
[job]
name = "tiny-eval"
[cohort]
phantoms = 2
seed = 0
anomaly_fraction = 0.0
[model]
kind = "demo"
weights = "untrained"
[runtime]
device = "cpu"
threads_per_worker = 1
[evaluate]
methods = ["saliency", "occlusion"]
targets = ["background", "lung_lower_lobe_left", "heart"]
runs = 4
subset_fraction = 0.05
n_perturbations = 1
stability_samples = [1, 2]
stability_patients = 1
"""


@pytest.fixture(autouse=True, scope="module")
def _restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_evaluate_command_stores_rows_and_prints_the_table(tmp_path, capsys):
    job = tmp_path / "eval.toml"
    job.write_text(JOB)
    db = tmp_path / "e.duckdb"
    assert main(["evaluate", str(job), "--db", str(db), "--patients", "1", "--run-id", "r1"]) == 0
    out = capsys.readouterr().out
    assert "evaluation r1: 1 patient(s), 2 method(s)" in out
    assert "Faithfulness ↑" in out and "Target class: background" in out
    assert main(["evaluate", str(job), "--db", str(db), "--patients", "1", "--run-id", "r2"]) == 0
    with store.open(db) as s:
        rows = s.evaluations()
    assert set(rows.columns) >= {"run_id", "patient_id", "target", "method", "metric", "value", "params"}
    r1, r2 = (rows.filter(pl.col("run_id") == r).drop("run_id", "created_at") for r in ("r1", "r2"))
    assert r1.height > 0 and r1["patient_id"].n_unique() == 1
    untimed = pl.col("metric") != "wall_time_s"
    a, b = r1.filter(untimed).drop("params"), r2.filter(untimed).drop("params")
    assert a.equals(b)  # the same seed gives identical numbers
    assert '"runs": 4' in r1["params"][0]
    # re-running a run id replaces its rows
    assert main(["evaluate", str(job), "--db", str(db), "--patients", "1", "--run-id", "r1"]) == 0
    with store.open(db) as s:
        assert s.evaluations("r1").height == r1.height


def test_bad_job_is_a_user_error(tmp_path, capsys):
    job = tmp_path / "bad.toml"
    job.write_text(JOB.replace("runs = 4", "runs = 4\nrunz = 3"))
    assert main(["evaluate", str(job), "--db", str(tmp_path / "x.duckdb")]) == 2
    err = capsys.readouterr().err
    assert "unknown key(s) ['runz']" in err and len(err.strip().splitlines()) == 1
    job.write_text(JOB.replace('"heart"]', '"spleen"]'))
    assert main(["evaluate", str(job), "--db", str(tmp_path / "x.duckdb")]) == 2
    assert "spleen" in capsys.readouterr().err
    job.write_text(JOB.replace('"occlusion"]', '"lime"]'))
    assert main(["evaluate", str(job), "--db", str(tmp_path / "x.duckdb")]) == 2


def test_demo_job_parses():
    (job, untrained), spec = load_evaluation(job_file("evaluate_demo.toml"))
    assert job.cohort.phantoms == 8 and not untrained
    assert len(spec.methods) == 7 and spec.targets[0] == "background" and len(spec.targets) == 7
    assert spec.with_paper_defaults().subset_of(48 * 40 * 40) == 230  # 0.3% of a demo volume
