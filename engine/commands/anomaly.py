"""``agg2exp anomaly --run ID``: per-class isolation forests on RoI masses, scores stored."""

from __future__ import annotations

import argparse

from engine.commands.query import add_db_argument
from engine.vocabulary import MEAN_TARGET, SIGNS


def handle(args: argparse.Namespace) -> int:
    """Fit within the run (or on --reference-run), score the run, store model and scores."""
    from engine import store
    from engine.analytics.anomaly import score_run

    with store.open_writer(args.db) as s:
        run_id = s.require_run(args.run)
        ref = s.require_run(args.reference_run) if args.reference_run else None
        contamination = (None if args.contamination is None else
                         args.contamination if args.contamination == "auto" else float(args.contamination))
        model, scores = score_run(
            s, run_id=run_id, reference_run_id=ref, settings=args.settings, seed=args.seed,
            n_estimators=args.n_estimators, contamination=contamination, method=args.method, sign=args.sign,
            rois=args.rois,
        )
        s.write_anomaly(model=model, scores=scores)
        reasons = model.get("reasons")
        if reasons is not None:
            s.write_anomaly_reasons(model_id=model["model_id"], run_id=run_id, reasons=reasons)
    mean = scores.filter(scores["target"] == MEAN_TARGET).sort("score", descending=True)
    print(f"model {model['model_id']} ({model['mode']}, fitted on {model['fit_run_id']}): "
          f"{mean.height} patients scored over {len(model['features'])} classes")
    if model["spearman_dice"] is not None:
        print(f"Spearman(mean score, mean foreground Dice) = {model['spearman_dice']:.3f} "
              f"(p = {model['spearman_p']:.3g})")
    print("most anomalous: " + ", ".join(f"{r['patient_id']} ({r['score']:.3f})"
                                          for r in mean.head(args.show).iter_rows(named=True)))
    reasons = model.get("reasons")
    if reasons is not None and reasons.height:
        for pid in mean.head(args.show)["patient_id"].to_list():
            top = reasons.filter(reasons["patient_id"] == pid)
            print(f"  {pid}: " + "; ".join(f"{r['target']} in {r['roi']} z={r['z']:+.1f}"
                                           for r in top.iter_rows(named=True)))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "anomaly", help="score patients with per-class isolation forests on RoI importances",
        description="One isolation forest per class on the patients' RoI mass vectors; higher score = more anomalous.",
    )
    p.add_argument("--run", default=None, help="run to score (default the latest run)")
    p.add_argument("--reference-run", default=None, help="fit the forests on this run instead of the scored one")
    p.add_argument("--settings", choices=("engine", "paper"), default="engine",
                   help="'paper': the reference notebook's settings (seed 123, Dice over all classes, per-class "
                        "Spearman); default engine (seed 0, Dice over the foreground)")
    p.add_argument("--seed", type=int, default=None, help="random seed of the forests (default: the settings')")
    p.add_argument("--n-estimators", type=int, default=None, help="trees per forest (default 100)")
    p.add_argument("--contamination", default=None, help="'auto' or a fraction (default auto)")
    p.add_argument("--rois", choices=("parts", "joined"), default="parts",
                   help="RoI set: 'parts' (default) leaves joined RoIs such as lung out; 'joined' uses them instead "
                        "of their parts")
    p.add_argument("--method", default=None, help="attribution method (needed when the run holds several)")
    p.add_argument("--sign", default="abs", choices=SIGNS, help="attribution sign (default abs)")
    p.add_argument("--show", type=int, default=5, help="how many top patients to print (default 5)")
    add_db_argument(p)
    p.set_defaults(handler=handle)
