"""The shipped model on a phantom cohort: planted anomalies surface, audits find the real bias only.

Runs without Ray (``PatientProcessor`` in-process) so the suite stays fast; the Ray path is tested
in ``tests/runtime``. Figures asserted here are reported in the README.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from sklearn.metrics import roc_auc_score

from engine import phantoms, store
from engine.analytics import anomaly
from engine.analytics.audit import audit_column
from engine.jobs import JobSpec
from engine.pipeline import PatientProcessor
from engine.store import PatientResult

N_PATIENTS = 30
ANOMALY_FRACTION = 0.2  # 6 planted anomalies, every type at least once


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pl.DataFrame]:
    root = tmp_path_factory.mktemp("demo_cohort")
    manifest = phantoms.generate_cohort(root / "phantoms", n_patients=N_PATIENTS, seed=11,
                                        anomaly_fraction=ANOMALY_FRACTION)
    spec = JobSpec.from_dict({
        "job": {"name": "demo-cohort"},
        "cohort": {"manifest": str(root / "phantoms" / "manifest.csv")},
        "model": {"kind": "demo"},
        "attribution": {"method": "saliency"},
    })
    proc = PatientProcessor(spec)
    db = root / "demo.duckdb"
    with store.open_writer(db) as w:
        w.create_run("demo", config=spec.to_dict())
        w.register_patients("demo", manifest)
        for record in manifest.iter_rows(named=True):
            out = proc.process(record)
            assert isinstance(out, PatientResult), out
            w.write_patient("demo", out)
        model, scores = anomaly.score_run(w, run_id="demo", seed=0)
        w.write_anomaly(model=model, scores=scores)
    return db, manifest


def test_planted_anomalies_rank_among_the_most_anomalous(demo_store):
    db, manifest = demo_store
    with store.open(db) as s:
        ranking = s.anomaly_scores("demo").filter(pl.col("target") == "__mean__").sort("score", descending=True)
    planted = set(manifest.filter(pl.col("anomaly"))["patient_id"].to_list())
    k = len(planted)
    ids = ranking["patient_id"].to_list()
    recall_2k = len(planted & set(ids[: 2 * k])) / k
    auc = roc_auc_score([pid in planted for pid in ids], ranking["score"].to_numpy())
    print(f"planted {k}: ranks {sorted(ids.index(p) + 1 for p in planted)}, recall@{2 * k} = {recall_2k:.2f}, "
          f"ROC AUC = {auc:.2f}")
    assert planted & set(ids[:5])  # a planted anomaly is among the five most anomalous
    assert recall_2k >= 0.5
    assert auc >= 0.65


def test_audit_finds_site_bias_and_nothing_for_a_random_column(demo_store):
    db, _ = demo_store
    with store.open(db) as s:
        patients = s.patients("demo")
        importances = s.importances("demo")
    normal = patients.filter(~pl.col("anomaly"))  # the planted anomalies are not a site effect
    ids = normal["patient_id"]
    imp = importances.filter(pl.col("patient_id").is_in(ids.implode()))  # type: ignore[union-attr]
    site = audit_column(normal, imp, column="site", n_boot=200)
    rand = audit_column(normal, imp, column="random_group", n_boot=200)
    print(f"site: {int(site['significant'].sum())} of {site.height} tests significant after BH; "
          f"random_group: {int((rand['q_value'] < 0.05).sum())} of {rand.height}")
    assert site["significant"].sum() >= 1
    assert (rand["q_value"] < 0.05).sum() == 0
