"""``agg2exp run JOB.toml``: run a job specification on Ray and stream results into the store.

Exit status: 0 when every patient is done, 1 when some patients failed (their reasons are in
the ``patients`` table and were printed), 2 for a job that cannot run as written, 3 when the run
stopped by itself before finishing (no worker could be placed or answered within
``[runtime] worker_timeout_s``, or the cluster lost every node that could host one): what is
done stays done, and rerunning the same command resumes.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from engine import store
from engine.jobs import JobSpec, RuntimeSpec
from engine.runtime import RunSummary, run_job


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared by ``run`` and ``demo``."""
    p.add_argument("--db", default=store.DEFAULT_DB, help=f"store file (default ./{store.DEFAULT_DB})")
    p.add_argument("--run-id", default=None, help="run id (default: job name + hash of its settings)")
    p.add_argument("--address", default=None,
                   help="Ray cluster to join (default: $RAY_ADDRESS, else a local Ray on loopback)")
    p.add_argument("--workers", type=int, default=None,
                   help="at most this many actors (default: one per GPU, else one per CPU slot, "
                        "including nodes that join the cluster during the run)")
    p.add_argument("--worker-timeout", type=float, default=None, metavar="SECONDS",
                   help="stop the run (exit 3) when no worker can be placed or answers for this long "
                        "(default: [runtime] worker_timeout_s, 120)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def with_runtime(spec: JobSpec, args: argparse.Namespace) -> JobSpec:
    """Apply command-line overrides of the [runtime] section."""
    rt: RuntimeSpec = spec.runtime
    if args.address:
        rt = replace(rt, address=args.address)
    if getattr(args, "worker_timeout", None) is not None:
        rt = replace(rt, worker_timeout_s=args.worker_timeout)
    return replace(spec, runtime=rt)


def print_summary(summary: RunSummary) -> None:
    c = summary.counts
    print(f"run {summary.run_id}: {c.get('done', 0)} patients done, {c.get('failed', 0)} failed"
          + (f", {summary.skipped_done} already done before this invocation" if summary.skipped_done else "")
          + f" ({summary.seconds:.1f} s)")
    rows = ", ".join(f"{n} {t}" for t, n in summary.rows.items())
    print(f"stored: {rows}")
    if c.get("failed", 0):
        with store.open(summary.db) as s:
            failed = s.frame(
                "SELECT patient_id, error FROM patients WHERE run_id = ? AND status = 'failed' ORDER BY patient_id",
                [summary.run_id],
            )
        for r in failed.iter_rows(named=True):
            print(f"  failed {r['patient_id']}: {r['error']}")
    print(f"database: {Path(summary.db).resolve()}")
    if summary.stopped:
        print(f"run {summary.run_id} stopped before finishing: {summary.stopped}. "
              f"{c.get('done', 0)} patients done are kept, {c.get('pending', 0)} pending; "
              "rerun the same command to resume", file=sys.stderr)


def handle(args: argparse.Namespace) -> int:
    spec = with_runtime(JobSpec.load(args.job), args)
    summary = run_job(
        spec, db=args.db, run_id=args.run_id, resume=not args.no_resume, address=spec.runtime.address,
        workers=args.workers, progress=not args.no_progress,
    )
    print_summary(summary)
    return summary.exit_code


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "run", help="run a job specification (jobs/*.toml)",
        description="Explain a cohort with the job's model and attribution method; rows stream into the store. "
                    "Re-running the same job resumes it: only patients not yet done are computed.",
    )
    p.add_argument("job", type=Path, help="job specification (TOML)")
    p.add_argument("--resume", action="store_true", help="continue an existing run (the default for the same run id)")
    p.add_argument("--no-resume", action="store_true", help="refuse to continue an existing run")
    add_run_arguments(p)
    p.set_defaults(handler=handle)
