"""``agg2exp report --run ID --out DIR``: a self-contained HTML report of one run."""

from __future__ import annotations

import argparse
from pathlib import Path

from engine.commands.graph import RULES
from engine.commands.query import add_db_argument
from engine.errors import UserError


def handle(args: argparse.Namespace) -> int:
    """Write the report and print its path."""
    from engine.report.html import write_report

    if args.top_k < 0:
        raise UserError(f"--top-k must be 0 or more (got {args.top_k})")
    if args.rule not in RULES:  # argparse checks choices; kept for library callers of handle()
        raise UserError(f"unknown edge rule {args.rule!r}; choose one of {', '.join(RULES)}")
    path = write_report(
        args.db, run_id=args.run, out_dir=args.out, top_k=args.top_k, graph_rule=args.rule,
        graph_options={"threshold": args.threshold, "k": args.k, "quantile": args.quantile},
        recompute_maps=not args.no_maps, device=args.device,
    )
    print(path)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "report", help="write a self-contained HTML report of a run (figures embedded)",
        description=("Run summary, per-class RoI importance distributions (Fig. 3), the global RoI graph "
                     "(Fig. 4), the anomaly ranking with the most and least anomalous patients (Fig. 5), "
                     "stored audits and evaluations, in one HTML file with the images embedded."),
    )
    p.add_argument("--run", default=None, help="run to report (default the latest run)")
    p.add_argument("--out", type=Path, default=Path("report"), help="output folder (default ./report)")
    p.add_argument("--top-k", type=int, default=3, help="most/least anomalous patients shown (default 3)")
    p.add_argument("--rule", choices=RULES, default="cumulative", help="graph edge rule (default cumulative)")
    p.add_argument("--threshold", type=float, default=0.35, help="cumulative rule cap (default 0.35)")
    p.add_argument("--k", type=int, default=5, help="topk rule: edges per class (default 5)")
    p.add_argument("--quantile", type=float, default=0.75, help="quantile rule (default 0.75)")
    p.add_argument("--no-maps", action="store_true",
                   help="do not recompute attribution maps for the shown patients (slices without overlays)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"),
                   help="device for recomputing maps (default cpu)")
    add_db_argument(p)
    p.set_defaults(handler=handle)
