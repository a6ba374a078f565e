"""``agg2exp audit --run ID --by sex,age,site``: bias audit of anomalies and importances."""

from __future__ import annotations

import argparse

from engine.commands.query import add_db_argument, add_output_arguments, write_frame
from engine.vocabulary import SIGNS


def handle(args: argparse.Namespace) -> int:
    """Run the audit, store it, and print the ranked results."""
    import polars as pl

    from engine import store
    from engine.analytics.audit import audit_run, precision_note

    columns = [c.strip() for c in args.by.split(",") if c.strip()]
    with store.open_writer_or_live(args.db) as s:
        stored = not s.read_only
        audit_id, result, has_scores = audit_run(
            s, run_id=args.run, columns=columns, model_id=args.model, top_fraction=args.top_fraction,
            outlier_rule=args.outlier_rule, rois=args.rois, method=args.method, sign=args.sign, n_boot=args.n_boot,
            seed=args.seed, alpha=args.alpha, save=stored,
        )
        run_id = s.require_run(args.run)
        if not has_scores:
            print(f"note: the run has no anomaly scores, so the outlier tests are skipped "
                  f"(run `agg2exp anomaly --run {run_id}` to add them)")
        note = precision_note(s.run_info(run_id))
        if note:
            print(note)
    shown = result if args.all else result.filter(pl.col("rank") <= args.top)
    write_frame(shown, fmt=args.format, out=args.out)
    if args.out is None or args.format == "table":
        n_sig = int(result["significant"].sum())
        print(f"audit {audit_id}: {result.height} tests over {len(columns)} column(s), {n_sig} with q < {args.alpha}")
    if not stored:
        print(f"not stored: a run is writing {args.db}, so this audit is of its committed patients only; rerun "
              "`agg2exp audit` after it finishes to store it")
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
    p.add_argument("--outlier-rule", choices=("decision", "union"), default="decision",
                   help="outliers: mean decision < 0 (default) or 'union', the paper's rule (any class flags it)")
    p.add_argument("--rois", choices=("parts", "joined"), default="parts",
                   help="RoI set of the importance tests: 'parts' (default) or 'joined'")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the CIs (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--alpha", type=float, default=0.05, help="FDR level for 'significant' (default 0.05)")
    p.add_argument("--method", default=None, help="attribution method (needed when the run holds several)")
    p.add_argument("--sign", default="abs", choices=SIGNS, help="attribution sign (default abs)")
    p.add_argument("--top", type=int, default=20, help="rows per column to print (default 20)")
    p.add_argument("--all", action="store_true", help="print every test")
    add_output_arguments(p)
    add_db_argument(p)
    p.set_defaults(handler=handle)
