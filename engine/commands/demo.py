"""``agg2exp demo``: generate the phantom cohort and run the whole pipeline with the shipped model."""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

from typing import TYPE_CHECKING

from engine.commands.run import add_run_arguments, print_summary, show_progress, with_runtime
from engine.resources import job_file
from engine.vocabulary import MEAN_TARGET

if TYPE_CHECKING:
    from engine.jobs import JobSpec

DEMO_JOB = job_file("demo.toml")


def load_demo_spec(*, out_dir: Path, patients: int | None = None) -> JobSpec:
    """The shipped ``engine/resources/jobs/demo.toml``, with its phantoms written under ``out_dir``."""
    from engine.jobs import JobSpec

    spec = JobSpec.load(DEMO_JOB)
    cohort = replace(spec.cohort, out_dir=str((out_dir / "phantoms").resolve()))
    if patients is not None:
        cohort = replace(cohort, phantoms=patients)
    return replace(spec, cohort=cohort)


def print_top_anomalies(db: Path, run_id: str, k: int = 5) -> None:
    from engine import store
    from engine.analytics.anomaly import reasons_by_patient

    with store.open(db) as s:
        scores = s.top_anomalies(run_id, k=k, target=MEAN_TARGET)
        model_id = s.latest_anomaly_model(run_id)
        model = s.anomaly_model(model_id) if model_id else {}
        why = reasons_by_patient(s.anomaly_reasons(run_id, model_id)) if model_id else {}
    if scores.height == 0:
        print("no anomaly scores (fewer than two patients done)")
        return
    print(f"most anomalous patients ({model.get('scorer')} on {model.get('feature_set')}, higher = more anomalous; "
          "reasons: features furthest from the cohort, robust z):")
    for r in scores.iter_rows(named=True):
        keys = ("age", "sex", "site", "scanner_kernel", "contrast", "anomaly_type")
        shown = ", ".join(f"{key}={r[key]}" for key in keys if r.get(key) is not None)
        print(f"  {r['patient_id']}  score {r['score']:.3f}  {shown}")
        if why.get(str(r["patient_id"])):
            print(f"      why: {why[str(r['patient_id'])]}")


#: Metadata the demo audits; random_group is assigned by coin flip, a negative control.
AUDIT_COLUMNS = ("site", "sex", "age", "contrast", "random_group")


def print_audit(db: Path, run_id: str) -> None:
    """Audit the demo run by its metadata (stored in ``audits``) and print one line per column."""
    import polars as pl

    from engine import store
    from engine.analytics.audit import audit_run

    with store.open_writer(db) as s:
        audit_id, result, _ = audit_run(s, run_id=run_id, columns=AUDIT_COLUMNS, n_boot=200)
    counts = result.group_by("column", maintain_order=True).agg(pl.col("significant").sum(), pl.len())
    shown = ", ".join(f"{r['column']} {r['significant']}/{r['len']}" for r in counts.iter_rows(named=True))
    print(f"bias audit {audit_id} (tests with BH q < 0.05 per metadata column; random_group is a coin flip): {shown}")


def handle(args: argparse.Namespace) -> int:
    from engine.runtime import run_job

    out_dir = Path(args.out)
    spec = with_runtime(load_demo_spec(out_dir=out_dir, patients=args.patients), args)
    run_id = args.run_id or time.strftime("demo-%Y%m%d-%H%M%S")
    summary = run_job(spec, db=args.db, run_id=run_id, resume=True, address=spec.runtime.address,
                      workers=args.workers, progress=show_progress(args))
    print_summary(summary)
    if summary.stopped:
        return summary.exit_code  # no analytics on a run that could not finish; rerunning resumes it
    print_top_anomalies(Path(args.db), summary.run_id)
    if summary.counts.get("done", 0) >= 4:
        print_audit(Path(args.db), summary.run_id)
    if not args.no_report:
        try:
            from engine.report.html import write_report
        except ImportError:
            pass
        else:
            path = write_report(args.db, run_id=summary.run_id, out_dir=out_dir / "report")
            print(f"report: {Path(path).resolve()}")
    return summary.exit_code


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "demo", help="generate phantoms and run the whole pipeline with the shipped model",
        description="Generates a deterministic cohort of synthetic thorax CTs (engine/resources/jobs/demo.toml), explains all 17 "
                    "classes with SmoothGrad on Ray workers, stores RoI importances in DuckDB, scores anomalies "
                    "and writes an HTML report.",
    )
    p.add_argument("--out", default="agg2exp_out", help="folder for phantoms and the report (default ./agg2exp_out)")
    p.add_argument("--patients", type=int, default=None, help="phantoms to generate (default 32)")
    p.add_argument("--no-report", action="store_true", help="skip the HTML report")
    add_run_arguments(p)
    p.set_defaults(handler=handle)
