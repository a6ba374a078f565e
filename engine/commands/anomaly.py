"""``agg2exp anomaly --run ID``: anomaly scores of a run's patients (default k-NN, masses + prediction), reasons."""

from __future__ import annotations

import argparse

from engine.commands.query import add_db_argument
from engine.vocabulary import MEAN_TARGET, SIGNS


def handle(args: argparse.Namespace) -> int:
    """Fit within the run (or on --reference-run), score the run, store model and scores."""
    from engine import store
    from engine.analytics.anomaly import reasons_by_patient, score_run

    with store.open_writer_or_live(args.db) as s:
        run_id = s.require_run(args.run)
        ref = s.require_run(args.reference_run) if args.reference_run else None
        contamination = (None if args.contamination is None else
                         args.contamination if args.contamination == "auto" else float(args.contamination))
        model, scores = score_run(
            s, run_id=run_id, reference_run_id=ref, settings=args.settings, seed=args.seed,
            n_estimators=args.n_estimators, contamination=contamination, method=args.method, sign=args.sign,
            rois=args.rois, scorer=args.scorer, feature_set=args.feature_set, reasons=args.top_k_reasons,
        )
        stored = not s.read_only
        if stored:
            s.write_anomaly(model=model, scores=scores)
            reasons = model.get("reasons")
            if reasons is not None:
                s.write_anomaly_reasons(model_id=model["model_id"], run_id=run_id, reasons=reasons)
    mean = scores.filter(scores["target"] == MEAN_TARGET).sort("score", descending=True)
    feats = model["features"]
    n_features = sum(len(v) for v in feats.values()) if isinstance(feats, dict) else len(feats)
    n_classes = scores.filter(scores["target"] != MEAN_TARGET)["target"].n_unique()
    print(f"model {model['model_id']} ({model['scorer']} on {model['feature_set']}, {model['mode']}, fitted on "
          f"{model['fit_run_id']}): {mean.height} patients scored on {n_features} features of {n_classes} classes")
    if model["spearman_dice"] is not None:
        print(f"Spearman(mean score, mean foreground Dice) = {model['spearman_dice']:.3f} "
              f"(p = {model['spearman_p']:.3g})")
    why = reasons_by_patient(model.get("reasons"))
    print("most anomalous (score, top reasons as robust z against the fit cohort):")
    for r in mean.head(args.show).iter_rows(named=True):
        print(f"  {r['patient_id']}  {r['score']:.3f}  {why.get(str(r['patient_id']), '')}".rstrip())
    if not stored:
        print(f"not stored: a run is writing {args.db}, so these scores are of its {mean.height} committed patients "
              f"only; rerun `agg2exp anomaly` after it finishes to store them")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "anomaly", help="score patients' explanations and predictions for anomalies, with reasons",
        description=("Score every done patient of a run (higher = more anomalous) and store the scores, the model "
                     "(enough to rescore later) and each patient's top reasons. Default: the block ensemble, one "
                     "k-nearest-neighbour score per block of features (RoI masses, what the model predicted, the "
                     "input's level and its local detail) averaged as robust z-scores (chosen on held-out anomaly "
                     "kinds, see BENCHMARKS.md); --settings paper: the paper's per-class isolation forests on masses."),
    )
    p.add_argument("--run", default=None, help="run to score (default the latest run)")
    p.add_argument("--reference-run", default=None, help="fit the forests on this run instead of the scored one")
    p.add_argument("--settings", choices=("engine", "paper"), default="engine",
                   help="'paper': the paper's mode, per-class isolation forests on masses with the reference "
                        "notebook's settings (seed 123, Dice over all classes, per-class Spearman); default engine "
                        "(seed 0, Dice over the foreground)")
    # Names are checked by score_run (with a did-you-mean): importing scoring here would load scikit-learn.
    p.add_argument("--scorer", default=None,
                   help="scorer (default 'blocks'; 'paper' under --settings paper): 'paper' = one isolation "
                        "forest per class, 'forest' = one on all features, 'covariance', 'neighbours', 'ensemble', "
                        "'blocks' = one k-NN per block of features (masses, prediction, input level, input detail), "
                        "robust z-scores averaged")
    p.add_argument("--feature-set", default=None,
                   help="features: mass, signed_mass, mean, prediction, input, mass+prediction, prediction+input, "
                        "mass+prediction+input (default 'mass+prediction+input'; 'mass' for the paper's scorer)")
    p.add_argument("--top-k-reasons", type=int, default=3, help="reasons stored and shown per patient (default 3)")
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
