"""bf16 against exact fp32 through the whole pipeline: the anomaly ranking and the bias audit they give.

Runs the demo job (``engine/resources/jobs/demo.toml``: its phantoms, model and settings) twice on
the same cohort, once in exact fp32 and once with ``autocast = "bf16"`` (applied where the CPU has
native bf16; elsewhere the job runs fp32 and logs why), through the real code paths: Ray actors, the store's writer, the engine's anomaly scoring
(run by the job) and its bias audit (``audit_run``, as ``agg2exp demo`` calls it). Then compares

* the RoI importances: Spearman of each (patient, class) RoI-mass vector (sign abs), median and minimum;
* the anomaly ranking: Spearman of the per-patient scores, overlap of the top k, and each run's
  AUC for the planted anomalies (phantoms with ``anomaly_type`` other than none);
* the audit: per metadata column, the significant tests (BH q < 0.05) of each run, their Jaccard
  overlap, and the tests significant in one run only;
* the time per patient (the actors' ``attribute`` stage, median) and the run's wall time.

    python benchmarks/bf16_cohort.py --patients 32 --json bf16_cohort.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from engine import store  # noqa: E402
from engine.analytics.audit import audit_run  # noqa: E402
from engine.commands.demo import AUDIT_COLUMNS, load_demo_spec  # noqa: E402
from engine.runtime import run_job  # noqa: E402
from engine.vocabulary import MEAN_TARGET  # noqa: E402


def run(spec: Any, db: Path, run_id: str, workers: int | None) -> dict[str, Any]:
    t0 = time.perf_counter()
    summary = run_job(spec, db=db, run_id=run_id, resume=True, workers=workers, progress=False)
    wall = time.perf_counter() - t0
    if summary.counts.get("done", 0) < 4:
        raise SystemExit(f"{run_id}: only {summary.counts} patients done; the comparison needs at least 4")
    with store.open_writer(db) as s:
        audit_id, audit, _ = audit_run(s, run_id=run_id, columns=AUDIT_COLUMNS, n_boot=200)
    with store.open(db) as s:
        status = s.patients(run_id)
        scores = s.anomaly_model_scores(run_id).filter(pl.col("target") == MEAN_TARGET)
        meta = s.patient_metadata(run_id, status=None)
        mass = (s.importances(run_id, lazy=True)  # filters pushed down to DuckDB
                .filter((pl.col("stat") == "mass") & (pl.col("sign") == "abs"))
                .select("patient_id", "target", "roi", "value").collect())
    timings = [t if isinstance(t, dict) else json.loads(t) for t in status["timings"].to_list() if t]
    attribute = [t["attribute"] for t in timings if "attribute" in t]
    return {"wall_s": wall, "attribute_s": attribute, "audit": audit, "audit_id": audit_id, "scores": scores,
            "meta": meta, "mass": mass}


def auc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """ROC AUC of ``scores`` for the ``positive`` patients, or None when either group is empty."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(positive, scores)) if 0 < positive.sum() < len(positive) else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--patients", type=int, default=32)
    ap.add_argument("--workers", type=int, default=None, help="actors (default: one per CPU slot)")
    ap.add_argument("--top-k", type=int, default=5)
    ap.add_argument("--dir", type=Path, default=None, help="working folder (default: a temporary one)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    work = args.dir or Path(tempfile.mkdtemp(prefix="bf16_cohort_"))
    work.mkdir(parents=True, exist_ok=True)
    demo = load_demo_spec(out_dir=work, patients=args.patients)
    exact = replace(demo, attribution=replace(demo.attribution, autocast=None))
    bf16 = replace(demo, attribution=replace(demo.attribution, autocast="bf16"))
    results = {}
    for name, spec in (("fp32", exact), ("bf16", bf16)):
        print(f"running the demo job in {name} on {args.patients} patients ...", flush=True)
        results[name] = run(spec, work / f"{name}.duckdb", f"demo-{name}", args.workers)
        r = results[name]
        print(f"  {name}: {r['wall_s']:.1f} s wall, attribute median {statistics.median(r['attribute_s']):.2f} s "
              f"per patient", flush=True)
    a, b = results["fp32"], results["bf16"]
    out: dict[str, Any] = {"patients": args.patients, "autocast": bf16.attribution.autocast}

    # speed
    out.update(wall_s={k: results[k]["wall_s"] for k in results},
               attribute_median_s={k: statistics.median(results[k]["attribute_s"]) for k in results})
    out["attribute_fp32_over_bf16"] = out["attribute_median_s"]["fp32"] / out["attribute_median_s"]["bf16"]

    # importances: Spearman per (patient, class) RoI-mass vector
    joined = a["mass"].join(b["mass"], on=["patient_id", "target", "roi"], suffix="_bf16")
    rhos = []
    for _, g in joined.group_by(["patient_id", "target"]):
        if g.height >= 3 and g["value"].n_unique() > 1 and g["value_bf16"].n_unique() > 1:
            rhos.append(float(spearmanr(g["value"], g["value_bf16"]).statistic))
    out.update(mass_spearman_median=float(np.median(rhos)), mass_spearman_min=float(np.min(rhos)),
               mass_pairs=len(rhos))

    # anomaly ranking
    sa = a["scores"].select("patient_id", pl.col("score").alias("fp32"))
    sb = b["scores"].select("patient_id", pl.col("score").alias("bf16"))
    sc = sa.join(sb, on="patient_id").join(a["meta"].select("patient_id", "anomaly_type"), on="patient_id", how="left")
    k = min(args.top_k, sc.height)
    top = {n: set(sc.sort(n, descending=True)["patient_id"][:k]) for n in ("fp32", "bf16")}
    planted = (sc["anomaly_type"].fill_null("none") != "none").to_numpy()
    out.update(anomaly_spearman=float(spearmanr(sc["fp32"], sc["bf16"]).statistic), anomaly_top_k=k,
               anomaly_top_k_overlap=len(top["fp32"] & top["bf16"]) / k,
               planted_auc={n: auc(sc[n].to_numpy(), planted) for n in ("fp32", "bf16")},
               planted=int(planted.sum()))

    # audit: the significant tests of each run, per column
    keys = [c for c in ("column", "family", "test", "target", "roi") if c in a["audit"].columns]
    per_column = {}
    for col in AUDIT_COLUMNS:
        sig = {}
        for n in ("fp32", "bf16"):
            t = results[n]["audit"].filter((pl.col("column") == col) & pl.col("significant"))
            sig[n] = {tuple(r) for r in t.select(keys).iter_rows()}
        union = sig["fp32"] | sig["bf16"]
        per_column[col] = {"fp32": len(sig["fp32"]), "bf16": len(sig["bf16"]),
                           "tests": int(a["audit"].filter(pl.col("column") == col).height),
                           "jaccard": (len(sig["fp32"] & sig["bf16"]) / len(union)) if union else None,
                           "fp32_only": len(sig["fp32"] - sig["bf16"]), "bf16_only": len(sig["bf16"] - sig["fp32"])}
    out["audit"] = per_column
    out["audit_keys"] = keys

    print(f"importances: RoI-mass Spearman per (patient, class), median {out.get('mass_spearman_median', float('nan')):.4f}, "
          f"minimum {out.get('mass_spearman_min', float('nan')):.4f} over {out.get('mass_pairs', 0)} pairs")
    print(f"anomaly ranking: Spearman {out['anomaly_spearman']:.3f}; top-{k} overlap {out['anomaly_top_k_overlap']:.2f}; "
          f"planted AUC fp32 {out['planted_auc']['fp32']}, bf16 {out['planted_auc']['bf16']} ({out['planted']} planted)")
    for col, c in per_column.items():
        jac = "n/a (none significant)" if c["jaccard"] is None else f"{c['jaccard']:.2f}"
        print(f"audit {col:13s}: significant fp32 {c['fp32']}/{c['tests']}, bf16 {c['bf16']}/{c['tests']}, "
              f"Jaccard {jac} (fp32 only {c['fp32_only']}, bf16 only {c['bf16_only']})")
    print(f"time: attribute median fp32 {out['attribute_median_s']['fp32']:.2f} s, bf16 "
          f"{out['attribute_median_s']['bf16']:.2f} s per patient ({out['attribute_fp32_over_bf16']:.2f}x); wall "
          f"fp32 {out['wall_s']['fp32']:.1f} s, bf16 {out['wall_s']['bf16']:.1f} s")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
