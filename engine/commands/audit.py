"""``agg2exp audit --run ID --by sex,age,site``: bias audit of anomalies and importances."""

from __future__ import annotations

import argparse
import hashlib
import json

import polars as pl

from engine import store
from engine.analytics.audit import AuditError, audit
from engine.commands.query import add_db_argument, add_output_arguments, write_frame


def handle(args: argparse.Namespace) -> int:
    """Run the audit, store it, and print the ranked results."""
    columns = [c.strip() for c in args.by.split(",") if c.strip()]
    if not columns:
        raise AuditError("give the metadata columns to audit, e.g. --by sex,age,site")
    with store.open_writer(args.db) as s:
        run_id = s.require_run(args.run)
        patients = s.patients(run_id)
        meta_cols = [c for c in patients.columns if c not in
                     ("run_id", "image_path", "label_path", "status", "error", "traceback", "attempts",
                      "worker", "seconds", "timings", "updated_at")]
        patients = patients.filter(pl.col("status") == "done").select(meta_cols)
        scores = s.anomaly_model_scores(run_id, args.model)
        model_id = scores["model_id"][0] if scores.height else None
        if scores.height == 0:
            print(f"note: run {run_id} has no anomaly scores, so the outlier tests are skipped "
                  f"(run `agg2exp anomaly --run {run_id}` to add them)")
        params = {"by": columns, "top_fraction": args.top_fraction, "n_boot": args.n_boot, "seed": args.seed,
                  "alpha": args.alpha, "method": args.method, "sign": args.sign}
        result = audit(patients, s.importances(run_id), columns=columns, scores=scores if scores.height else None,
                       top_fraction=args.top_fraction, method=args.method, sign=args.sign, n_boot=args.n_boot,
                       seed=args.seed, alpha=args.alpha)
        audit_id = "audit-" + hashlib.sha1(json.dumps([run_id, model_id, params]).encode()).hexdigest()[:10]
        s.write_audit(audit_id=audit_id, run_id=run_id, results=result, model_id=model_id, params=params)
        s.publish_snapshot(force=True)
    shown = result if args.all else result.filter(pl.col("rank") <= args.top)
    write_frame(shown, fmt=args.format, out=args.out)
    if args.out is None or args.format == "table":
        n_sig = int(result["significant"].sum())
        print(f"audit {audit_id}: {result.height} tests over {len(columns)} column(s), {n_sig} with q < {args.alpha}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "audit", help="test whether anomalies and importances differ between metadata groups",
        description=("Per metadata column: outliers vs inliers (Mann-Whitney / Fisher / chi-square) and every "
                     "(target, roi) importance across groups (Mann-Whitney / Kruskal-Wallis; numeric columns split "
                     "at the median), Benjamini-Hochberg within each column, effect sizes with bootstrap CIs."),
    )
    p.add_argument("--run", default=None, help="run to audit (default the latest run)")
    p.add_argument("--by", required=True, help="comma-separated metadata columns, e.g. sex,age,site")
    p.add_argument("--model", default=None, help="anomaly model id (default the run's latest)")
    p.add_argument("--top-fraction", type=float, default=None,
                   help="outliers = this top fraction by mean score (default: decision < 0, else top 10%%)")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the CIs (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--alpha", type=float, default=0.05, help="FDR level for 'significant' (default 0.05)")
    p.add_argument("--method", default=None, help="attribution method (needed when the run holds several)")
    p.add_argument("--sign", default="abs", choices=store.SIGNS, help="attribution sign (default abs)")
    p.add_argument("--top", type=int, default=20, help="rows per column to print (default 20)")
    p.add_argument("--all", action="store_true", help="print every test")
    add_output_arguments(p)
    add_db_argument(p)
    p.set_defaults(handler=handle)
