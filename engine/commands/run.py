"""``agg2exp run JOB.toml``: run a job specification on Ray and stream results into the store.

Exit status: 0 when every patient is done, 1 when some patients failed (their reasons are in
the ``patients`` table and were printed), 2 for a job that cannot run as written, 3 when the run
stopped by itself before finishing (no worker could be placed or answered within
``[runtime] worker_timeout_s``, or the cluster lost every node that could host one): what is
done stays done, and rerunning the same command resumes; 4 for an internal error.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from engine.vocabulary import DEFAULT_DB

if TYPE_CHECKING:
    from engine.jobs import JobSpec
    from engine.runtime import RunSummary


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared by ``run`` and ``demo``."""
    p.add_argument("--db", default=DEFAULT_DB, help=f"store file (default ./{DEFAULT_DB})")
    p.add_argument("--run-id", default=None, help="run id (default: job name + hash of its settings)")
    p.add_argument("--address", default=None,
                   help="Ray cluster to join (default: $RAY_ADDRESS, else a local Ray on loopback)")
    p.add_argument("--workers", type=int, default=None,
                   help="at most this many actors (default: one per GPU, else one per CPU slot, "
                        "including nodes that join the cluster during the run)")
    p.add_argument("--worker-timeout", type=float, default=None, metavar="SECONDS",
                   help="stop the run (exit 3) when no worker can be placed or answers for this long "
                        "(default: [runtime] worker_timeout_s, 120)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (none either when stderr is not a terminal)")


def show_progress(args: argparse.Namespace) -> bool:
    """A progress bar only on a terminal: redirected output gets log lines, not carriage returns."""
    return not args.no_progress and sys.stderr.isatty()


def with_runtime(spec: JobSpec, args: argparse.Namespace) -> JobSpec:
    """Apply command-line overrides of the [runtime] section."""
    rt = spec.runtime
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
        from engine import store

        with store.open(summary.db) as s:
            failed = s.failed_patients(summary.run_id)
        for r in failed.iter_rows(named=True):
            print(f"  failed {r['patient_id']}: {r['error']}")
    print(f"database: {Path(summary.db).resolve()}")
    if summary.stopped:
        print(f"run {summary.run_id} stopped before finishing: {summary.stopped}. "
              f"{c.get('done', 0)} patients done are kept, {c.get('pending', 0)} pending; "
              "rerun the same command to resume", file=sys.stderr)


def handle(args: argparse.Namespace) -> int:
    from engine.jobs import JobSpec
    from engine.runtime import run_job

    spec = with_runtime(JobSpec.load(args.job), args)
    summary = run_job(
        spec, db=args.db, run_id=args.run_id, resume=args.resume, address=spec.runtime.address,
        workers=args.workers, progress=show_progress(args),
    )
    print_summary(summary)
    return summary.exit_code


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "run", help="run a job specification (e.g. engine/resources/jobs/*.toml)",
        description="Explain a cohort with the job's model and attribution method; rows stream into the store. "
                    "Re-running the same job resumes it: only patients not yet done are computed.",
    )
    p.add_argument("job", type=Path, help="job specification (TOML)")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="continue an existing run with the same run id, computing only patients not yet done "
                        "(default); --no-resume refuses to touch an existing run")
    add_run_arguments(p)
    p.set_defaults(handler=handle)
