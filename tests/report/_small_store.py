"""A real, small store built the way a run builds it, without Ray.

Phantoms are generated, processed by :class:`engine.pipeline.PatientProcessor` with the demo UNet
(the trained weights when ``engine/assets/demo_unet.pt`` exists, else an untrained copy saved to a
file so that the report can reload the very same model), written with the store's writer, then
scored with the isolation forests like ``engine.runtime.runner._score_anomalies`` and audited.
One extra patient with a missing image is recorded as failed, so the report shows a failure.

To stay fast on a CPU only two classes are explained, with one SmoothGrad sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl

RUN_ID = "small-run"
N_PATIENTS = 4
TARGETS = ("aorta", "heart")

_CACHE: dict[str, "SmallStore"] = {}


@dataclass(frozen=True)
class SmallStore:
    db: Path
    run_id: str
    manifest: pl.DataFrame
    weights: Path
    root: Path


def demo_weights(root: Path) -> Path:
    """The trained demo weights if present, else an untrained demo UNet saved under ``root``."""
    import torch

    from engine.models import DEMO_WEIGHTS, demo_model

    if Path(DEMO_WEIGHTS).is_file():
        return Path(DEMO_WEIGHTS)
    path = root / "untrained_demo_unet.pt"
    if not path.is_file():
        torch.save(demo_model(weights=None).module.state_dict(), path)
    return path


def build_small_store(root: Path, *, n_patients: int = N_PATIENTS, audit: bool = True) -> SmallStore:
    """Create the store at ``root/agg2exp.duckdb`` (phantoms under ``root/phantoms``)."""
    from engine import phantoms, store
    from engine.analytics import anomaly
    from engine.analytics.audit import audit as run_audit
    from engine.job_setup import explainer_record
    from engine.jobs import JobSpec
    from engine.pipeline import Failure, PatientProcessor

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    manifest = phantoms.generate_cohort(root / "phantoms", n_patients=n_patients, seed=0)
    weights = demo_weights(root)
    spec = JobSpec.from_dict({
        "job": {"name": "small", "run_id": RUN_ID},
        "cohort": {"manifest": str(root / "phantoms" / "manifest.csv")},
        "model": {"kind": "demo", "weights": str(weights)},
        "attribution": {"method": "smoothgrad", "n_samples": 1, "targets": list(TARGETS)},
        "runtime": {"device": "cpu"},
    }, base_dir=root)
    broken = manifest.head(1).with_columns(
        pl.lit("phantom-missing").alias("patient_id"),
        pl.lit(str(root / "phantoms" / "images" / "does-not-exist.nii.gz")).alias("image_path"),
    )
    full = pl.concat([manifest, broken])
    processor = PatientProcessor(spec, worker_name="test")
    db = root / "agg2exp.duckdb"
    with store.open_writer(db) as w:
        # as the runner records a run (engine.runtime.runner.run_job): the job, the classes, the resolved explainer
        config = spec.to_dict() | {"class_names": list(processor.loaded.class_names),
                                   "explainer": explainer_record(spec, processor.loaded)}
        w.create_run(RUN_ID, config=config, versions={"engine": "test"}, job_name=spec.name)
        w.register_patients(RUN_ID, full)
        for record in full.iter_rows(named=True):
            outcome = processor.process(record)
            if isinstance(outcome, Failure):
                w.mark_failed(RUN_ID, outcome.patient_id, error=outcome.error, traceback=outcome.traceback,
                              worker=outcome.worker)
            else:
                w.write_patient(RUN_ID, outcome)
        model, scores = anomaly.score_run(w, run_id=RUN_ID, seed=0, n_estimators=50, method="smoothgrad")
        w.write_anomaly(model=model, scores=scores)
        w.write_anomaly_reasons(model_id=model["model_id"], run_id=RUN_ID, reasons=model["reasons"])
        if audit:
            patients = w.patients(RUN_ID).filter(pl.col("status") == "done").select("patient_id", "sex", "age")
            result = run_audit(patients, w.importances(RUN_ID), columns=["sex"],
                               scores=scores.with_columns(pl.lit(model["model_id"]).alias("model_id")), n_boot=50)
            w.write_audit(audit_id="audit-test", run_id=RUN_ID, results=result, model_id=model["model_id"],
                          params={"by": ["sex"]})
        w.finish_run(RUN_ID, status="partial", report={"seconds": 1.0, "counts": w.status_counts(RUN_ID)})
    return SmallStore(db=db, run_id=RUN_ID, manifest=manifest, weights=weights, root=root)


def small_store(tmp_path_factory: object) -> SmallStore:
    """One store per test session, shared by every test that asks for it."""
    if "store" not in _CACHE:
        root = tmp_path_factory.mktemp("small_store")  # type: ignore[attr-defined]
        _CACHE["store"] = build_small_store(root)
    return _CACHE["store"]
