"""``agg2exp graph --run ID --rule cumulative --threshold 0.35 --out DIR``: global RoI graph."""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

from engine.commands.query import add_db_argument
from engine.vocabulary import SIGNS

#: Edge selection rules of ``engine.analytics.graph.select_edges`` (checked equal by a test).
RULES = ("topk", "cumulative", "quantile")


def handle(args: argparse.Namespace) -> int:
    """Build the graph(s), write JSON, GraphML and a figure per subgroup; optionally store edges."""
    from engine import store
    from engine.analytics.graph import export_graph, graph_run, safe_name

    options = {"rule": args.rule, "k": args.k, "threshold": args.threshold, "quantile": args.quantile,
               "exclude_background": not args.keep_background, "self_edges": not args.no_self_edges}
    opener = store.open_writer_or_live if args.save else store.open
    with opener(args.db) as s:
        run_id = s.require_run(args.run)
        graphs, params = graph_run(s, run_id=run_id, by=args.by, method=args.method, sign=args.sign,
                                   rois=args.rois, **options)
        if args.save and s.read_only:
            print(f"not stored: a run is writing {args.db}, so this graph is of its committed patients only; rerun "
                  "with --save after it finishes to store the edges")
        elif args.save:
            graph_id = "graph-" + hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
            n = s.write_graph(graph_id=graph_id, run_id=run_id, edges=graphs, params=params)
            print(f"stored {n} edges as {graph_id}")
    for group, edges in graphs.items():
        name = "graph" if group == "all" else f"graph_{safe_name(args.by)}_{safe_name(group)}"
        title = f"{run_id}: {args.rule}" + ("" if group == "all" else f" ({group})")
        paths = export_graph(edges, args.out, name=name, params={**params, "subgroup": group},
                             figure_format=args.figure_format, title=title)
        print(f"{group}: {edges.height} edges -> " + ", ".join(str(p) for p in paths))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "graph", help="build the global RoI importance graph (JSON, GraphML, figure)",
        description="Edges roi -> target weighted by the cohort-mean mass, selected per rule.",
    )
    p.add_argument("--run", default=None, help="run (default the latest run)")
    p.add_argument("--rule", choices=RULES, default="cumulative", help="edge selection rule (default cumulative)")
    p.add_argument("--threshold", type=float, default=0.35, help="cumulative rule: running-sum cap (default 0.35)")
    p.add_argument("--k", type=int, default=5, help="topk rule: edges per target (default 5)")
    p.add_argument("--quantile", type=float, default=0.75, help="quantile rule: keep weights above it (default 0.75)")
    p.add_argument("--keep-background", action="store_true", help="keep background as node (excluded by default)")
    p.add_argument("--no-self-edges", action="store_true", help="drop c -> c edges before selection")
    p.add_argument("--by", default=None, help="one graph per group of this metadata column")
    p.add_argument("--method", default=None, help="attribution method (needed when the run holds several)")
    p.add_argument("--sign", default="abs", choices=SIGNS, help="attribution sign (default abs)")
    p.add_argument("--rois", choices=("parts", "joined"), default="parts",
                   help="RoI set: 'parts' (default) leaves joined RoIs such as lung out; 'joined' uses them instead "
                        "of their parts")
    p.add_argument("--figure-format", choices=("png", "svg"), default="png", help="figure format (default png)")
    p.add_argument("--out", type=Path, default=Path("graph"), help="output folder (default ./graph)")
    p.add_argument("--save", action="store_true", help="also store the edges in the store (table graph_edges)")
    add_db_argument(p)
    p.set_defaults(handler=handle)
