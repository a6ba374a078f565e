"""Anomaly detection measured on anomaly kinds the scorer was not tuned on.

Cohorts come from the phantom generator: per cohort seed, ``--normals`` normal patients and
``--per-kind`` patients of every kind of the anomaly library (:mod:`engine.corruptions`: acquisition
faults, pathology, devices, anatomical variants, wrong inputs), each a fresh patient. Every patient
goes through the real engine path (``PatientProcessor``: NIfTI read, MONAI preprocessing, the demo
UNet, SmoothGrad with the demo job's settings, RoI aggregation); its features are what the store
holds: RoI importances, and per predicted class the volume, softmax confidence and entropy and the
mean and spread of the model's input. Each patient's features are cached (Parquet, one folder per
settings hash), so the scorers can be re-run in seconds.

Evaluation, per cohort seed and kind k: the cohort is the normals plus the anomalies of kind k; each
(scorer, feature set) is fitted on that cohort and scores it (within-run, as ``agg2exp`` does). Held-out
selection: for every kind k the setting with the best mean ROC AUC on the *other* kinds is chosen and
measured on k. Reported per kind and overall, for every setting and for the held-out choice: ROC AUC,
average precision, recall at the top 10% (``sklearn.metrics``) and each kind's median rank (1 = most
anomalous) over its patients and seeds, with the cohort size.

    python benchmarks/anomaly_detection.py --seeds 0 --normals 21 --per-kind 2 --extract-only      # features, cached
    python benchmarks/anomaly_detection.py --cached-only --seeds 0 --normals 21 --per-kind 2 --json out.json
    python benchmarks/anomaly_detection.py --quick --json quick.json        # seconds; used by the tests
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from engine import corruptions, phantoms  # noqa: E402
from engine.jobs import JobSpec, read_job_file  # noqa: E402
from engine.resources import job_file  # noqa: E402
from engine.labels import JOINED_ROIS  # noqa: E402
from engine.vocabulary import PREDICTION_FEATURES  # noqa: E402
from engine.analytics.scoring import BLOCKS, DEFAULT_SETTING, FEATURE_SETS  # noqa: E402

#: Feature kinds of the explanation (the first block of the block ensemble).
EXPLANATION_KINDS = set(BLOCKS[0])

# ----------------------------------------------------------------------------- features through the engine


def job_spec(n_samples: int | None = None) -> JobSpec:
    """The demo job's model, preprocessing, attribution and RoI settings (``n_samples`` overridable)."""
    data = read_job_file(job_file("demo.toml"))
    data.pop("anomaly", None)
    if n_samples is not None:
        data["attribution"]["n_samples"] = int(n_samples)
    data["cohort"] = {"manifest": "unused.csv"}
    return JobSpec.from_dict(data, base_dir=job_file("demo.toml").parent)


def settings_key(spec: JobSpec, shape: Sequence[int], spacing: Sequence[float]) -> tuple[str, dict[str, Any]]:
    """A short hash of everything that changes a patient's features, and the settings it hashes."""
    a = spec.attribution
    settings = {
        "shape": list(shape), "spacing": list(spacing), "method": a.method, "n_samples": a.n_samples,
        "sigma": a.sigma, "objective": a.objective, "overlap": a.overlap, "blend": a.blend, "seed": a.seed,
        "preprocess": spec.to_sections().get("preprocess", {}), "model": spec.to_sections()["model"],
        "rois": spec.to_sections().get("rois", {}),
        "features": 3,  # 2: confidence and entropy as the engine stores them, plus input_mean/input_std; 3: input_local
    }
    return hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12], settings


def cohort_plan(seed: int, n_normals: int, per_kind: int, kinds: Sequence[str]) -> list[dict[str, Any]]:
    """Patients of one cohort: normals are indices 0..n-1, then ``per_kind`` fresh patients per kind."""
    plan = [{"cohort_seed": seed, "index": i, "kind": "none", "family": "none"} for i in range(n_normals)]
    # one patient of every kind first, then the second of every kind, ...: a run cut short still covers all kinds
    for r in range(per_kind):
        for j, kind in enumerate(kinds):
            fam = corruptions.KINDS[kind].family
            plan.append({"cohort_seed": seed, "index": n_normals + j * per_kind + r, "kind": kind, "family": fam})
    return plan


def patient_features(proc: Any, record: dict[str, Any]) -> dict[str, float]:
    """One patient's feature row through the engine: RoI importances, predicted volumes, confidence."""
    from engine.pipeline import Failure

    case = proc.load(record)
    res = proc.compute(case)
    if isinstance(res, Failure):  # pragma: no cover - compute raises rather than returns failures
        raise RuntimeError(res.error)
    joined = set(JOINED_ROIS)
    imp = res.importances.filter(~pl.col("roi").is_in(list(joined)))
    row: dict[str, float] = {}
    for t, roi, stat, sign, v in imp.select("target", "roi", "stat", "sign", "value").iter_rows():
        if v is not None:
            row[f"{stat}_{sign}|{t}|{roi}"] = float(v)
    # what the model predicted and the input over each predicted class, as the engine stores them
    # (``predictions``: voxels, confidence, entropy, input_mean, input_std; null for a class not predicted)
    for col, kind in PREDICTION_FEATURES:
        for cls, v in res.predictions.select("class", col).iter_rows():
            if v is not None:
                row[f"{kind}|{cls}"] = float(v)
    return row


def extract(
    *,
    seeds: Sequence[int],
    n_normals: int,
    per_kind: int,
    kinds: Sequence[str],
    cache_dir: Path,
    shape: Sequence[int] = phantoms.DEFAULT_SHAPE,
    spacing: Sequence[float] = phantoms.DEFAULT_SPACING,
    n_samples: int | None = None,
    threads: int = 1,
    log: bool = True,
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Feature rows of every planned patient, computed once per settings and cached as Parquet."""
    import torch

    from engine.pipeline import PatientProcessor

    torch.set_num_threads(threads)
    spec = job_spec(n_samples)
    key, settings = settings_key(spec, shape, spacing)
    folder = cache_dir / f"features-{key}"
    (folder / "patients").mkdir(parents=True, exist_ok=True)
    (folder / "settings.json").write_text(json.dumps(settings, indent=1, default=str))
    proc = None
    frames, seconds = [], []
    plan = [p for s in seeds for p in cohort_plan(s, n_normals, per_kind, kinds)]
    for n, p in enumerate(plan):
        name = f"s{p['cohort_seed']}-i{p['index']:04d}-{p['kind']}"
        part = folder / "patients" / f"{name}.parquet"
        if not part.is_file():
            proc = proc or PatientProcessor(spec, worker_name="benchmark")
            t0 = time.perf_counter()
            ph = phantoms.make_phantom(p["index"], seed=p["cohort_seed"], shape=shape, spacing=spacing,
                                       corruption=None if p["kind"] == "none" else p["kind"])
            with tempfile.TemporaryDirectory() as tmp:
                ipath, lpath = Path(tmp) / "image.nii.gz", Path(tmp) / "label.nii.gz"
                phantoms._save_nifti(ipath, ph.image.astype(np.int16), ph.affine)
                phantoms._save_nifti(lpath, ph.labels, ph.affine)
                record = {"patient_id": name, "image_path": str(ipath), "label_path": str(lpath)}
                feats = patient_features(proc, record)
            meta = {"patient_id": name, **p, "is_anomaly": p["kind"] != "none",
                    "detail": str(ph.metadata.get("anomaly_detail", ""))}
            pl.DataFrame([{**meta, **feats}]).write_parquet(part)
            seconds.append(time.perf_counter() - t0)
            if log:
                print(f"[features] {n + 1}/{len(plan)} {name} {seconds[-1]:.1f}s", flush=True)
        frames.append(pl.read_parquet(part))
    df = pl.concat(frames, how="diagonal_relaxed")
    df.write_parquet(folder / "features.parquet")
    info = {"settings_key": key, "settings": settings, "cache": str(folder), "patients": len(plan),
            "computed": len(seconds), "median_seconds_per_patient": float(np.median(seconds)) if seconds else None}
    return df, info


# ----------------------------------------------------------------------------- metrics and evaluation


def detection_metrics(is_anomaly: Sequence[bool], anomaly_score: Sequence[float], *,
                      top_fraction: float = 0.1) -> dict[str, Any]:
    """ROC AUC, average precision, recall among the top ``top_fraction`` (at least one patient) and the
    ranks (1 = most anomalous, ties averaged) of the anomalous patients, for one scored cohort."""
    from scipy.stats import rankdata
    from sklearn.metrics import average_precision_score, roc_auc_score

    y = np.asarray(is_anomaly, dtype=bool)
    a = np.asarray(anomaly_score, dtype=np.float64)
    n_top = max(1, int(np.ceil(top_fraction * len(y))))
    ranks = rankdata(-a, method="average")
    return {
        "roc_auc": float(roc_auc_score(y, a)),
        "average_precision": float(average_precision_score(y, a)),
        "recall_top": float(np.sum(y & (ranks <= n_top)) / y.sum()),
        "ranks": [float(r) for r in ranks[y]],
        "n": int(len(y)),
    }


def settings_grid(feature_sets: Sequence[str], scorers: Sequence[str]) -> list[tuple[str, str]]:
    """(scorer, feature set) pairs; the paper's per-class forests take RoI masses only."""
    return [(sc, fs) for sc in scorers for fs in feature_sets if sc != "paper" or fs == "mass"]


def _name(setting: tuple[str, str]) -> str:
    return f"{setting[0]}/{setting[1]}"


def score_cohorts(df: pl.DataFrame, *, settings: Sequence[tuple[str, str]], scorer_seeds: Sequence[int],
                  top_fraction: float = 0.1, min_normals: int = 6, jobs: int = 1) -> pl.DataFrame:
    """One row per (setting, cohort seed, scorer seed, kind): each kind's cohort is the seed's normals plus
    that kind's patients, fitted and scored within itself. ``jobs`` > 1 scores cohorts in that many
    processes (the rows are the same, in the same order)."""
    from engine.analytics.scoring import SCORERS

    order = {name: i for i, name in enumerate(SCORERS)}  # members before the ensemble
    settings = sorted(settings, key=lambda st: order.get(st[0], 0))
    tasks = []
    for seed in sorted(df["cohort_seed"].unique().to_list()):
        part = df.filter(pl.col("cohort_seed") == seed)
        normals = part.filter(~pl.col("is_anomaly"))
        if normals.height < min_normals:
            continue
        for kind in sorted(part.filter(pl.col("is_anomaly"))["kind"].unique().to_list()):
            cohort = pl.concat([normals, part.filter(pl.col("kind") == kind)], how="diagonal_relaxed")
            tasks.append((cohort, seed, kind, settings, list(scorer_seeds), top_fraction))
    if jobs > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn, not fork: a forked child of a process whose Polars/OpenMP thread pools already ran deadlocks
        with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            parts = list(pool.map(_score_cohort, *zip(*tasks)))
    else:
        parts = [_score_cohort(*t) for t in tasks]
    return pl.DataFrame([row for rows in parts for row in rows])


def _score_cohort(cohort: pl.DataFrame, seed: int, kind: str, settings: Sequence[tuple[str, str]],
                  scorer_seeds: Sequence[int], top_fraction: float) -> list[dict[str, Any]]:
    """Every setting fitted on one kind's cohort and scored within it."""
    from scipy.stats import percentileofscore

    from engine.analytics.scoring import feature_columns, feature_matrix, make_scorer

    warnings.filterwarnings("ignore", module="sklearn.covariance")  # in a worker process too
    y = cohort["is_anomaly"].to_numpy()
    family = cohort.filter(pl.col("is_anomaly"))["family"][0]
    member_scores: dict[tuple[str, str, int], np.ndarray] = {}
    rows = []
    for sc_name, fs in settings:
        if sc_name == "paper":
            data: Any = cohort.select(feature_columns(cohort.columns, "mass")).fill_null(0.0)
        else:
            names, data = feature_matrix(cohort, fs)
        for s in (scorer_seeds if sc_name != "neighbours" else scorer_seeds[:1]):
            if sc_name == "ensemble":
                # RankEnsemble(forest, covariance, neighbours) on the fit cohort itself is the mean of
                # the members' mid-rank percentiles (tests/analytics/test_scoring.py): reuse their scores
                parts = [member_scores.get((m, fs, s if m != "neighbours" else scorer_seeds[0]))
                         for m in ("forest", "covariance", "neighbours")]
                if any(p is None for p in parts):
                    a = make_scorer("ensemble", seed=s).fit(data).anomaly_score(data)
                else:
                    a = -np.mean([percentileofscore(-p, -p, kind="mean") for p in parts], axis=0)
            else:
                est = make_scorer(sc_name, seed=s)
                if "feature_names" in est.get_params(deep=False) and sc_name != "paper":
                    est.set_params(feature_names=names)
                a = est.fit(data).anomaly_score(data)
                member_scores[(sc_name, fs, s)] = a
            m = detection_metrics(y, a, top_fraction=top_fraction)
            rows.append({"setting": _name((sc_name, fs)), "scorer": sc_name, "feature_set": fs,
                         "cohort_seed": seed, "scorer_seed": s, "kind": kind, "family": family, **m})
    return rows


def _summary(rows: pl.DataFrame) -> dict[str, Any]:
    ranks = [r for rs in rows["ranks"].to_list() for r in rs]
    n = rows["n"].to_list()
    return {"roc_auc": float(rows["roc_auc"].mean()), "average_precision": float(rows["average_precision"].mean()),
            "recall_top10": float(rows["recall_top"].mean()), "median_rank": float(np.median(ranks)),
            "cohort_size": float(np.median(n)), "upper_half": bool(np.median(ranks) <= np.median(n) / 2),
            "cohorts": int(rows.height)}


def summarise(records: pl.DataFrame, *, paper_setting: str = "paper/mass") -> dict[str, Any]:
    """Per setting and kind, held-out selection per kind, the default and the paper's mode."""
    kinds = sorted(records["kind"].unique().to_list())
    settings = sorted(records["setting"].unique().to_list())
    per_setting: dict[str, Any] = {}
    for st in settings:
        r = records.filter(pl.col("setting") == st)
        per_kind = {k: _summary(r.filter(pl.col("kind") == k)) for k in kinds}
        per_setting[st] = {
            "overall": {**_summary(r), "mean_kind_auc": float(np.mean([v["roc_auc"] for v in per_kind.values()])),
                        "kinds_upper_half": sum(v["upper_half"] for v in per_kind.values())},
            "per_kind": per_kind,
        }
    def held_out(candidates: Sequence[str]) -> dict[str, Any]:
        """Choose on the other kinds (mean of per-kind AUCs), measure on the held-out kind."""
        held: dict[str, Any] = {}
        for k in kinds:
            def others_auc(st: str, k: str = k) -> float:
                return float(np.mean([v["roc_auc"] for kk, v in per_setting[st]["per_kind"].items() if kk != k]))

            chosen = max(candidates, key=others_auc)
            held[k] = {"chosen": chosen, "chosen_on_others_auc": others_auc(chosen),
                       **per_setting[chosen]["per_kind"][k]}
        return {
            "per_kind": held,
            "mean_roc_auc": float(np.mean([v["roc_auc"] for v in held.values()])),
            "mean_average_precision": float(np.mean([v["average_precision"] for v in held.values()])),
            "mean_recall_top10": float(np.mean([v["recall_top10"] for v in held.values()])),
            "kinds_upper_half": sum(v["upper_half"] for v in held.values()),
        }

    held_all = held_out(settings)
    # The engine's default must see the explanation too (an input-only score cannot see a model that
    # leans on the wrong structure over an ordinary input), so it is chosen among these settings.
    explained = [st for st in settings if set(FEATURE_SETS[st.split("/", 1)[1]]) & EXPLANATION_KINDS]
    held_expl = held_out(explained) if explained else None
    choices = [v["chosen"] for v in (held_expl or held_all)["per_kind"].values()]
    default = max(set(choices), key=lambda st: (choices.count(st), per_setting[st]["overall"]["mean_kind_auc"]))
    families = sorted(records["family"].unique().to_list())
    fam_of = dict(records.select("kind", "family").unique().iter_rows())
    out = {
        "kinds": kinds,
        "families": {f: [k for k in kinds if fam_of[k] == f] for f in families},
        "settings": settings,
        "per_setting": per_setting,
        "held_out": held_all,
        "held_out_explained": held_expl,
        "default": default,
        "engine_default": "/".join(DEFAULT_SETTING),
    }
    for label, st in (("default_summary", default), ("engine_default_summary", out["engine_default"]),
                      ("paper", paper_setting)):
        if st in per_setting:
            o = per_setting[st]["overall"]
            out[label] = {"setting": st, **o}
    engine = out.get("engine_default_summary")
    out["goal"] = {  # issue 15: the engine's default, on held-out kinds
        "default_mean_auc_ge_0.90": bool(engine and engine["mean_kind_auc"] >= 0.90),
        "default_every_kind_upper_half": bool(engine and engine["kinds_upper_half"] == len(kinds)),
        "held_out_selection_mean_auc_ge_0.90": held_all["mean_roc_auc"] >= 0.90,
    }
    return out


def reason_examples(df: pl.DataFrame, feature_set: str, *, top_k: int = 3) -> dict[str, Any]:
    """For the first patient of every kind (first cohort seed): the top reasons against the normals."""
    from engine.analytics.scoring import RobustProfile, feature_columns

    seed = min(df["cohort_seed"].to_list())
    part = df.filter(pl.col("cohort_seed") == seed)
    normals = part.filter(~pl.col("is_anomaly"))
    cols = feature_columns(part.columns, feature_set)
    out = {}
    for kind in sorted(part.filter(pl.col("is_anomaly"))["kind"].unique().to_list()):
        cohort = pl.concat([normals, part.filter(pl.col("kind") == kind)], how="diagonal_relaxed")
        x = cohort.select(cols).fill_null(0.0)
        prof = RobustProfile().fit(x)
        i = int(np.nonzero(cohort["is_anomaly"].to_numpy())[0][0])
        cls = prof.class_scores(x[i])[0][:top_k]
        feats = prof.reasons(x[i], top_k=top_k)[0]
        out[kind] = {"classes": [[c.target, round(c.score, 2)] for c in cls],
                     "features": [[f.feature, round(f.z, 2)] for f in feats]}
    return out


def print_table(summary: dict[str, Any]) -> None:
    h = summary["held_out"]
    print(f"held-out selection: mean ROC AUC {h['mean_roc_auc']:.3f}, AP {h['mean_average_precision']:.3f}, "
          f"recall@10% {h['mean_recall_top10']:.3f}, kinds in the upper half {h['kinds_upper_half']}/"
          f"{len(summary['kinds'])}")
    if summary.get("held_out_explained"):
        he = summary["held_out_explained"]
        print(f"held-out selection among settings with the explanation: mean ROC AUC {he['mean_roc_auc']:.3f}, "
              f"kinds in the upper half {he['kinds_upper_half']}/{len(summary['kinds'])}; chosen most often: "
              f"{summary['default']}")
    if summary.get("engine_default_summary"):
        e = summary["engine_default_summary"]
        print(f"engine default {e['setting']}: mean ROC AUC over kinds {e['mean_kind_auc']:.3f}, "
              f"kinds in the upper half {e['kinds_upper_half']}/{len(summary['kinds'])}")
    print(f"{'kind':20s} {'chosen':28s} {'AUC':>6s} {'AP':>6s} {'R@10%':>6s} {'med.rank':>9s}")
    for k, v in h["per_kind"].items():
        print(f"{k:20s} {v['chosen']:28s} {v['roc_auc']:6.3f} {v['average_precision']:6.3f} {v['recall_top10']:6.3f} "
              f"{v['median_rank']:5.1f}/{v['cohort_size']:.0f}")
    print(f"{'setting':28s} {'mean AUC':>8s} {'AP':>6s} {'R@10%':>6s} {'upper half':>10s}")
    for st, v in sorted(summary["per_setting"].items(), key=lambda kv: -kv[1]["overall"]["mean_kind_auc"]):
        o = v["overall"]
        print(f"{st:28s} {o['mean_kind_auc']:8.3f} {o['average_precision']:6.3f} {o['recall_top10']:6.3f} "
              f"{o['kinds_upper_half']:>4d}/{len(summary['kinds'])}")


# ----------------------------------------------------------------------------- CLI


def parse_args(argv: Iterable[str] | None = None) -> argparse.Namespace:
    from engine.analytics.scoring import FEATURE_SETS, SCORERS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="cohort seeds")
    ap.add_argument("--normals", type=int, default=24, help="normal patients per cohort")
    ap.add_argument("--per-kind", type=int, default=2, help="patients of each anomaly kind per cohort")
    ap.add_argument("--kinds", nargs="+", default=None, help="anomaly kinds (default: all of engine.corruptions)")
    ap.add_argument("--n-samples", type=int, default=None, help="SmoothGrad samples (default: the demo job's)")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "agg2exp" / "anomaly_benchmark",
                    help="feature cache folder")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--scorers", nargs="+", default=list(SCORERS))
    ap.add_argument("--feature-sets", nargs="+", default=list(FEATURE_SETS))
    ap.add_argument("--scorer-seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--jobs", type=int, default=1, help="processes for the scoring (default 1)")
    ap.add_argument("--extract-only", action="store_true", help="compute and cache features, no evaluation")
    ap.add_argument("--cached-only", action="store_true",
                    help="evaluate the patients already in the cache for these settings, computing none")
    ap.add_argument("--quick", action="store_true", help="tiny cohort for the tests")
    ap.add_argument("--json", type=Path, default=None, help="write the results as JSON here")
    return ap.parse_args(list(argv) if argv is not None else None)


def _cached(args: argparse.Namespace, kinds: Sequence[str]) -> tuple[pl.DataFrame, dict[str, Any]]:
    key, settings = settings_key(job_spec(args.n_samples), phantoms.DEFAULT_SHAPE, phantoms.DEFAULT_SPACING)
    folder = args.cache / f"features-{key}" / "patients"
    wanted = {f"s{p['cohort_seed']}-i{p['index']:04d}-{p['kind']}"
              for s in args.seeds for p in cohort_plan(s, args.normals, args.per_kind, kinds)}
    parts = [pl.read_parquet(f) for f in sorted(folder.glob("*.parquet")) if f.stem in wanted]
    if not parts:
        raise SystemExit(f"no cached patients for these settings in {folder}")
    return pl.concat(parts, how="diagonal_relaxed"), {"settings_key": key, "settings": settings,
                                                      "cache": str(folder.parent), "patients": len(parts),
                                                      "planned": len(wanted), "computed": 0}


def main(argv: Iterable[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    # MinCovDet warns on every small, nearly singular cohort; the scores stay defined
    warnings.filterwarnings("ignore", module="sklearn.covariance")
    kinds = list(args.kinds or corruptions.KINDS)
    if args.quick:
        args.seeds, args.normals, args.per_kind, args.n_samples = [0], 6, 1, 1
        args.scorer_seeds = [0]
        args.feature_sets = ["mass", "prediction"]
        kinds = list(args.kinds or ["missing_rescale", "situs_inversus"])
    t0 = time.perf_counter()
    if args.cached_only:
        df, info = _cached(args, kinds)
    else:
        df, info = extract(seeds=args.seeds, n_normals=args.normals, per_kind=args.per_kind, kinds=kinds,
                           cache_dir=args.cache, n_samples=args.n_samples, threads=args.threads,
                           log=not args.quick)
    result: dict[str, Any] = {
        "command": "python benchmarks/anomaly_detection.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": f"{platform.node()} {platform.machine()} ({platform.processor() or 'cpu'}), shared",
        "cohort": {"seeds": args.seeds, "normals": args.normals, "per_kind": args.per_kind, "kinds": kinds},
        "features": info,
        "extract_seconds": round(time.perf_counter() - t0, 1),
    }
    if not args.extract_only:
        t1 = time.perf_counter()
        records = score_cohorts(df, settings=settings_grid(args.feature_sets, args.scorers),
                                scorer_seeds=args.scorer_seeds, min_normals=min(6, args.normals), jobs=args.jobs)
        summary = summarise(records)
        result.update(summary)
        result["reasons"] = reason_examples(df, summary["default"].split("/", 1)[1])
        result["score_seconds"] = round(time.perf_counter() - t1, 1)
        print_table(summary)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str))
    return result


if __name__ == "__main__":
    main()
